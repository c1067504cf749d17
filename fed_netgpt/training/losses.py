"""Next-token losses on completion tokens: per position, per row (a pair), per site, through the output head."""

from __future__ import annotations

import torch
import torch.utils.checkpoint
from transformers import PreTrainedModel

from fed_netgpt.model.fused import cross_entropy_rows

LOGITS_CHUNK_BYTES = 1 << 30  # fp32 logits held at once by `row_loss_sums` (SmolLM2: ~5,400 positions)


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each position's cross-entropy for the next token, and where it counts (labels != -100), both [batch, seq].
    The labels are shifted instead of the logits: a contiguous [rows x vocab] view, no copy of the logits (at
    SmolLM2's 49,152-token vocabulary, slicing and transposing them cost 4x the time on the CPU)."""
    targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 up to fp32; fp64 stays
    losses = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                               ignore_index=-100, reduction="none")
    return losses.view(labels.shape), (targets != -100)


def sequence_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each row's mean cross-entropy over its own completion tokens (labels != -100), shape [batch]."""
    tokens, counted = token_losses(logits, labels)
    mask = counted.float()
    return (tokens * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def row_loss_sums(model: PreTrainedModel, batch: dict[str, torch.Tensor],
                  chunk_bytes: int = LOGITS_CHUNK_BYTES) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's summed next-token loss and its number of counted tokens (as a float), both [rows].

    Only the positions whose next token counts go through the output head: prompts and padding carry no loss,
    and on prompt pairs they are ~60 % of the positions. The fp32 logits over the vocabulary are still the
    biggest tensor of a LoRA step (at 49,152 entries, 4,096 counted positions take 0.8 GB), so they are
    computed a chunk of positions at a time (`head_losses`). A batch without "attention_mask" must be padded
    on the right: the causal mask alone then keeps real tokens from seeing the padding.
    """
    hidden = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                                 use_cache=False).last_hidden_state
    labels = batch["labels"]
    targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100).flatten()
    positions = (targets != -100).nonzero().squeeze(1)  # on a GPU this waits for the forward pass
    chunk = max(1, chunk_bytes // (model.config.vocab_size * 4))
    losses = head_losses(model.get_output_embeddings(), hidden.flatten(0, 1)[positions], targets[positions],
                         chunk)
    rows = positions // labels.shape[1]
    zeros = losses.new_zeros(labels.shape[0])
    return zeros.index_add(0, rows, losses), zeros.index_add(0, rows, torch.ones_like(losses))


def head_losses(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """Cross-entropy of `head(hidden)` ([positions, vocab] logits, log-softmax in at least fp32) against
    `targets`, `chunk` positions at a time. A frozen Linear head goes through `_FrozenHeadLosses`; a head with
    trainable weights (LoRA on lm_head) through autograd, each chunk recomputed in the backward pass."""
    if isinstance(head, torch.nn.Linear) and not any(p.requires_grad for p in head.parameters()):
        return _FrozenHeadLosses.apply(hidden, targets, head.weight, head.bias, chunk, hidden.requires_grad)

    def losses(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        logits = head(h)
        logp = torch.log_softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))
        return -logp.gather(1, t[:, None]).squeeze(1)

    return torch.cat([torch.utils.checkpoint.checkpoint(losses, hidden[i : i + chunk], targets[i : i + chunk],
                                                        use_reentrant=False)
                      for i in chunk_starts(len(targets), chunk)])


def chunk_starts(positions: int, chunk: int) -> range:
    """Where each chunk of positions starts; one (empty) chunk when there are none (a DP-SGD draw of no pair)."""
    return range(0, max(positions, 1), chunk)


class _FrozenHeadLosses(torch.autograd.Function):
    """Cross-entropy through a frozen Linear head that computes d(loss)/d(hidden) in the forward pass.

    With the head frozen, that gradient is (softmax - one-hot) · W per position, all of which the forward pass
    already has: each chunk's logits are used once and dropped, never kept or recomputed for the backward
    pass, which only scales the stored [positions, hidden] gradient by each loss's incoming gradient.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None, chunk: int, needs_grad: bool) -> torch.Tensor:
        losses, grads = [], []
        for i in chunk_starts(len(targets), chunk):
            logits = torch.nn.functional.linear(hidden[i : i + chunk], weight, bias)
            chunk_losses, grad_logits = cross_entropy_rows(logits, targets[i : i + chunk], needs_grad)
            del logits
            losses.append(chunk_losses)
            if grad_logits is not None:
                grads.append((grad_logits.to(weight.dtype) @ weight).to(hidden.dtype))
        ctx.save_for_backward(torch.cat(grads) if needs_grad else hidden.new_empty(0))
        return torch.cat(losses)

    @staticmethod
    def backward(ctx, grad_losses: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_losses[:, None].to(grad.dtype), None, None, None, None, None


def per_site_mean(row_sums: torch.Tensor, row_counts: torch.Tensor, index: torch.Tensor,
                  num_sites: int, empty: float = 0.0) -> torch.Tensor:
    """Each site's mean token loss over its own rows ([num_sites]); a site with no counted token gets `empty`."""
    sums = torch.zeros(num_sites, dtype=row_sums.dtype, device=row_sums.device).index_add(0, index, row_sums)
    counts = torch.zeros(num_sites, dtype=row_sums.dtype, device=row_sums.device).index_add(
        0, index, row_counts)
    return torch.where(counts > 0, sums / counts.clamp(min=1), empty)
