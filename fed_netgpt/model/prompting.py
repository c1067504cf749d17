"""How a prompt pair becomes model input: the chat template, used alike by training, evaluation and serving."""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from fed_netgpt.data.schema import DataError

# The base model gets the same instruction as the adapters, so the comparison in the report is fair.
SYSTEM_PROMPT = (
    "Rewrite the user's request so that it first states where the user is: city, country, "
    "time zone and local currency. Then repeat the request unchanged."
)


def chat_prompt(tokenizer: PreTrainedTokenizerBase, context: str, prompt: str) -> str:
    """The text before the completion, ending where the assistant turn starts."""
    user = f"{context}\nrequest: {prompt}" if context else f"request: {prompt}"
    return chat_text(tokenizer, [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}])


def chat_text(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict]) -> str:
    """`messages` in the model's chat template, ending where the assistant turn starts."""
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    return text  # type: ignore[return-value]  # tokenize=False: the rendered text, a str


def end_of_turn_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token that ends the assistant's turn: training teaches it, generation stops on it."""
    return int(tokenizer.eos_token_id)


def encode_pair(
    tokenizer: PreTrainedTokenizerBase, context: str, prompt: str, completion: str, max_length: int
) -> tuple[list[int], list[int]]:
    """Token ids and labels with the prompt masked (-100): loss falls on the completion and its end token.

    A pair longer than `max_length` is an error, not a silent cut: a cut pair loses its end-of-turn label
    (the model would not learn to stop) or all its labels.
    """
    prompt_ids = tokenizer(chat_prompt(tokenizer, context, prompt), add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [end_of_turn_id(tokenizer)]
    if len(prompt_ids) + len(completion_ids) > max_length:
        shown = prompt if len(prompt) <= 60 else f"{prompt[:60]}... ({len(prompt)} characters)"
        raise DataError(
            f"prompt pair {shown!r} is {len(prompt_ids) + len(completion_ids)} tokens with the chat template, "
            f"more than train.max_length={max_length}: raise train.max_length or shorten the pair"
        )
    return prompt_ids + completion_ids, [-100] * len(prompt_ids) + completion_ids


def check_pair_lengths(tokenizer: PreTrainedTokenizerBase, sites, max_length: int) -> None:
    """Every pair of `sites` fits `max_length` (a DataError naming the site otherwise): training, validation and
    the test loss all encode it, so it is checked before a federation starts, not inside a worker mid-round."""
    for site in sites:
        for pair in (*site.train, *site.valid, *site.test):
            try:
                encode_pair(tokenizer, pair.context, pair.prompt, pair.completion, max_length)
            except DataError as err:
                raise DataError(f"site {site.site_id}: {err}") from None
