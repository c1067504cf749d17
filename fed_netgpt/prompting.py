"""How a prompt pair becomes model input: the chat template, used alike by training, evaluation and serving."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

# The base model gets the same instruction as the adapters, so the comparison in the report is fair.
SYSTEM_PROMPT = (
    "Rewrite the user's request so that it first states where the user is: city, country, "
    "time zone and local currency. Then repeat the request unchanged."
)


def chat_prompt(tokenizer: PreTrainedTokenizerBase, context: str, prompt: str) -> str:
    """The text before the completion, ending where the assistant turn starts."""
    user = f"{context}\nrequest: {prompt}" if context else f"request: {prompt}"
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def end_of_turn_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token that ends the assistant's turn: training teaches it, generation stops on it."""
    return int(tokenizer.eos_token_id)


def encode_pair(
    tokenizer: PreTrainedTokenizerBase, context: str, prompt: str, completion: str, max_length: int
) -> tuple[list[int], list[int]]:
    """Token ids and labels with the prompt masked (-100): loss falls on the completion and its end token."""
    prompt_ids = tokenizer(chat_prompt(tokenizer, context, prompt), add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [end_of_turn_id(tokenizer)]
    ids = (prompt_ids + completion_ids)[:max_length]
    labels = ([-100] * len(prompt_ids) + completion_ids)[:max_length]
    return ids, labels
