"""Fewer GPU kernels for the frozen base's element-wise layers, with the same math.

A grouped multi-site step on a GPU spends most of its time in small element-wise kernels, not in matmuls: LLaMA's
RMSNorm alone is eight of them each way (cast up, square, mean, add, rsqrt, multiply, cast down, scale), run
twice a layer. torch has one fused RMSNorm kernel (`torch.nn.functional.rms_norm`, forward and backward), which
accumulates in fp32 as the original does; `fused_kernels` swaps it in and compiles each MLP block (the SiLU and
the product fused): a small graph shared by every layer, with dynamic shapes, so it compiles once in seconds
rather than the minutes a whole decoder layer takes.
(Compiling the rotary embedding the same way was tried: with dynamic shapes its kernel was slower than eager's.)
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from fed_netgpt.grouped_lora import GroupedLoraLinear


def _rms_norm(self: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """LlamaRMSNorm.forward in one kernel: normalized in fp32, rounded to the input's dtype, then scaled."""
    normed = F.rms_norm(hidden_states, hidden_states.shape[-1:], eps=self.variance_epsilon)
    return self.weight * normed


def _rms_norms(model: torch.nn.Module) -> list[torch.nn.Module]:
    """LLaMA-style RMSNorms: a `weight` and a `variance_epsilon`."""
    return [m for m in model.modules() if type(m).__name__.endswith("RMSNorm") and hasattr(m, "variance_epsilon")]


def _mlps(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Gated MLP blocks without a grouped LoRA layer inside (under DP-SGD its backward pass keeps each row's
    gradient from Python, which a compiled graph would not run)."""
    return [m for m in model.modules() if type(m).__name__.endswith("MLP") and hasattr(m, "act_fn")
            and not any(isinstance(child, GroupedLoraLinear) for child in m.modules())]


@contextlib.contextmanager
def fused_kernels(model: torch.nn.Module) -> Iterator[None]:
    """Inside: every RMSNorm of `model` runs the fused forward and every gated MLP block is compiled (dynamic
    shapes: one graph for all batches, kept by torch between uses). On exit the model is as transformers made it."""
    norms, mlps = _rms_norms(model), _mlps(model)
    for norm in norms:
        norm.forward = types.MethodType(_rms_norm, norm)
    for block in mlps:
        block.compile(dynamic=True)
    try:
        yield
    finally:
        for norm in norms:
            del norm.forward  # the class's own forward again
        for block in mlps:
            block._compiled_call_impl = None
