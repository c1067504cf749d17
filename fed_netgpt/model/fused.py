"""Fewer GPU kernels for the frozen base's element-wise layers, with the same math.

A grouped multi-site step on a GPU spends most of its time in small element-wise kernels, not in matmuls: LLaMA's
RMSNorm alone is eight of them each way (cast up, square, mean, add, rsqrt, multiply, cast down, scale), run
twice a layer. torch has one fused RMSNorm kernel (`torch.nn.functional.rms_norm`, forward and backward), which
accumulates in fp32 as the original does and applies the scale before it rounds; `fused_kernels` swaps it in and
compiles each MLP block (the SiLU and
the product fused): a small graph shared by every layer, with dynamic shapes, so it compiles once in seconds
rather than the minutes a whole decoder layer takes.

The rotary embedding was the biggest element-wise cost left (16 % of a 128-site step on an H200): transformers
applies it to the strided query and key views in five kernels each way (two products, a negation, a
concatenation, a sum), all on the slow non-contiguous path. `rotary` does it in one Triton kernel a tensor each
way, products and sum in fp32 and rounded once. (Compiling the rotary function with dynamic shapes was tried
first: its kernel was slower than eager's.)

The frozen output head's cross-entropy (`cross_entropy_rows`) is one Triton kernel too, on any CUDA device: the
fp32 log-softmax over 49,152 logits a position, its exp, scatter and cast were ~7 % of a 128-site step.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterator
from typing import Protocol

import torch
import torch.nn.functional as F
from transformers.models.llama import modeling_llama

from fed_netgpt.model.grouped_lora import GroupedLoraLinear

try:  # Triton comes with torch's CUDA builds; without it the rotary embedding stays transformers' own
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None


class _RMSNorm(Protocol):
    """What `_rms_norm` reads of the norm it replaces the forward of (LlamaRMSNorm and its copies)."""

    @property
    def weight(self) -> torch.Tensor: ...
    @property
    def variance_epsilon(self) -> float: ...


def _rms_norm(self: _RMSNorm, hidden_states: torch.Tensor) -> torch.Tensor:
    """LlamaRMSNorm.forward in one kernel: normalized and scaled in fp32, rounded once to the input's dtype
    (transformers rounds before scaling too; the separate scaling was 6 % of a 128-site step on an H200). A scale
    in another dtype than the input (fp32 under autocast) is applied after, in its dtype, as transformers does."""
    shape, eps = hidden_states.shape[-1:], self.variance_epsilon
    if self.weight.dtype == hidden_states.dtype:
        return F.rms_norm(hidden_states, shape, self.weight, eps=eps)
    return self.weight * F.rms_norm(hidden_states, shape, eps=eps)


def _rms_norms(model: torch.nn.Module) -> list[torch.nn.Module]:
    """LLaMA-style RMSNorms: a `weight` and a `variance_epsilon`."""
    return [m for m in model.modules() if type(m).__name__.endswith("RMSNorm") and hasattr(m, "variance_epsilon")]


def _mlps(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Gated MLP blocks without a grouped LoRA layer inside (under DP-SGD its backward pass keeps each row's
    gradient from Python, which a compiled graph would not run)."""
    return [m for m in model.modules() if type(m).__name__.endswith("MLP") and hasattr(m, "act_fn")
            and not any(isinstance(child, GroupedLoraLinear) for child in m.modules())]


if triton is not None:
    @triton.jit
    def _rotary_kernel(x, cos, sin, out, heads, positions,
                       x_batch, x_head, x_position, c_batch, c_position, o_batch, o_head, o_position,
                       HALF: tl.constexpr, HALF_BLOCK: tl.constexpr, HEAD_BLOCK: tl.constexpr,
                       BACKWARD: tl.constexpr):
        """One (row, position) a program, all its heads: out = x·cos + rotate_half(x)·sin, with
        rotate_half(x) = (-x2, x1) over the two halves; BACKWARD applies the transpose, (x1, x2) -> (x2, -x1)."""
        row, position = tl.program_id(0) // positions, tl.program_id(0) % positions
        head = tl.arange(0, HEAD_BLOCK)[:, None]
        d = tl.arange(0, HALF_BLOCK)[None, :]
        mask = (head < heads) & (d < HALF)
        at = x + row * x_batch + position * x_position + head * x_head + d
        x1 = tl.load(at, mask=mask).to(tl.float32)
        x2 = tl.load(at + HALF, mask=mask).to(tl.float32)
        angle = row * c_batch + position * c_position + d
        c1 = tl.load(cos + angle, mask=d < HALF).to(tl.float32)
        c2 = tl.load(cos + angle + HALF, mask=d < HALF).to(tl.float32)
        s1 = tl.load(sin + angle, mask=d < HALF).to(tl.float32)
        s2 = tl.load(sin + angle + HALF, mask=d < HALF).to(tl.float32)
        if BACKWARD:
            y1, y2 = x1 * c1 + x2 * s2, x2 * c2 - x1 * s1
        else:
            y1, y2 = x1 * c1 - x2 * s1, x2 * c2 + x1 * s2
        to = out + row * o_batch + position * o_position + head * o_head + d
        tl.store(to, y1.to(out.dtype.element_ty), mask=mask)
        tl.store(to + HALF, y2.to(out.dtype.element_ty), mask=mask)


    @triton.jit
    def _cross_entropy_kernel(logits, targets, losses, row_stride, vocab, BLOCK: tl.constexpr, GRAD: tl.constexpr):
        """One position a program: loss = logsumexp(x) - x[target] in fp32 over its logits x (two reads: running
        max and sum, then the target); with GRAD, x is overwritten with softmax(x) - onehot(target), rounded once."""
        row = tl.program_id(0).to(tl.int64)
        base = logits + row * row_stride
        cols = tl.arange(0, BLOCK)
        high = tl.full([BLOCK], float("-inf"), tl.float32)
        total = tl.zeros([BLOCK], tl.float32)
        for start in range(0, vocab, BLOCK):
            x = tl.load(base + start + cols, mask=start + cols < vocab, other=float("-inf")).to(tl.float32)
            new_high = tl.maximum(high, x)
            total = tl.where(new_high > float("-inf"),  # a lane past the end (vocab < BLOCK) stays 0, not nan
                             total * tl.exp(high - new_high) + tl.exp(x - new_high), 0.0)
            high = new_high
        peak = tl.max(high, 0)
        lse = peak + tl.log(tl.sum(total * tl.exp(high - peak), 0))
        target = tl.load(targets + row)
        tl.store(losses + row, lse - tl.load(base + target).to(tl.float32))
        if GRAD:
            for start in range(0, vocab, BLOCK):
                at = start + cols
                p = tl.exp(tl.load(base + at, mask=at < vocab, other=float("-inf")).to(tl.float32) - lse)
                p = tl.where(at == target, p - 1.0, p)
                tl.store(base + at, p.to(logits.dtype.element_ty), mask=at < vocab)


_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # float64 stays with torch: the kernel sums in fp32


def cross_entropy_rows(logits: torch.Tensor, targets: torch.Tensor,
                       grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each row's cross-entropy of `logits` [rows, vocab] against `targets` (log-softmax in fp32 at least) and,
    with `grad`, its gradient with respect to the logits, softmax - one-hot, in the logits' dtype. Every target
    must be a vocabulary index (the positions without one are left out before).

    On a GPU with Triton it is one kernel that reads each row twice and writes the gradient over the logits (which
    are then gone): transformers' way, a log-softmax in fp32, an exp, a scatter and a cast, moves ~4x the bytes,
    and at 49,152 entries a position that was ~7 % of a 128-site step on an H200. Elsewhere torch's ops."""
    if triton is not None and logits.is_cuda and logits.is_contiguous() and logits.dtype in _KERNEL_DTYPES:
        losses = torch.empty(len(targets), dtype=torch.float32, device=logits.device)
        if len(targets):
            _cross_entropy_kernel[(len(targets),)](logits, targets, losses, logits.stride(0), logits.shape[1],
                                                   BLOCK=4096, GRAD=grad, num_warps=8)
        return losses, logits if grad else None
    logp = torch.log_softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))
    del logits
    t = targets[:, None]
    losses = -logp.gather(1, t).squeeze(1)
    if not grad:
        return losses, None
    return losses, logp.exp_().scatter_add_(1, t, torch.full_like(t, -1, dtype=logp.dtype))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    """The kernel over x [rows, heads, positions, head_dim] (any strides, the last 1) with cos/sin [1 or rows,
    positions, head_dim]; the result is laid out [rows, positions, heads, head_dim], as a projection's view is."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    rows, heads, positions, dim = x.shape
    out = x.new_empty(rows, positions, heads, dim).transpose(1, 2)
    cos, sin = cos.contiguous(), sin.contiguous()
    if cos.shape[0] not in (1, rows) or cos.shape[1:] != (positions, dim) or sin.shape != cos.shape:
        raise ValueError(f"rotary: cos/sin of shapes {tuple(cos.shape)}, {tuple(sin.shape)} for x of shape "
                         f"{tuple(x.shape)}")
    per_row = cos.stride(0) if cos.shape[0] > 1 else 0  # one table shared by every row
    _rotary_kernel[(rows * positions,)](
        x, cos, sin, out, heads, positions, x.stride(0), x.stride(1), x.stride(2), per_row, cos.stride(1),
        out.stride(0), out.stride(1), out.stride(2), HALF=dim // 2, HALF_BLOCK=triton.next_power_of_2(dim // 2),
        HEAD_BLOCK=triton.next_power_of_2(heads), BACKWARD=backward)
    return out


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, sin, backward=True), None, None


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' `apply_rotary_pos_emb` for [rows, heads, positions, head_dim] queries and keys on a GPU,
    one kernel per tensor each way; any other case goes to transformers' own."""
    if triton is None or not q.is_cuda or unsqueeze_dim != 1 or cos.dim() != 3 or q.shape[-1] % 2:
        return _TRANSFORMERS_ROTARY(q, k, cos, sin, unsqueeze_dim)
    return _Rotary.apply(q, cos, sin), _Rotary.apply(k, cos, sin)


_TRANSFORMERS_ROTARY = modeling_llama.apply_rotary_pos_emb


_COMPILED_CALLS: dict[torch.nn.Module, Callable] = {}  # the frozen base lives as long as the process


def _compiled_call(block: torch.nn.Module) -> Callable:
    """What `block.compile(dynamic=True)` installs, made once a block: making it anew cost ~2-3 ms a block, 30
    blocks every grouped call."""
    if block not in _COMPILED_CALLS:
        _COMPILED_CALLS[block] = torch.compile(block._call_impl, dynamic=True)
    return _COMPILED_CALLS[block]


@contextlib.contextmanager
def fused_kernels(model: torch.nn.Module) -> Iterator[None]:
    """Inside: every RMSNorm of `model` runs the fused forward, every gated MLP block is compiled (dynamic
    shapes: one graph for all batches, kept by torch between uses) and LLaMA's rotary embedding is `rotary`.
    On exit the model is as transformers made it."""
    norms, mlps = _rms_norms(model), _mlps(model)
    for norm in norms:
        norm.forward = types.MethodType(_rms_norm, norm)
    for block in mlps:
        block._compiled_call_impl = _compiled_call(block)
    modeling_llama.apply_rotary_pos_emb = rotary  # process-wide while inside: any LLaMA pass gets the same values
    try:
        yield
    finally:
        modeling_llama.apply_rotary_pos_emb = _TRANSFORMERS_ROTARY
        for norm in norms:
            del norm.forward  # the class's own forward again
        for block in mlps:
            block._compiled_call_impl = None
