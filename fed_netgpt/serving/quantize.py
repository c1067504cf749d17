"""Int8 weights for decoding on a CPU: a token of decoding reads every weight once, so on a CPU it is bound by
memory bandwidth, and int8 weights read a quarter of fp32's bytes.

Weight-only, per output channel (scale = max |row| / 127), activations in bf16 at the matmul
(`torch._weight_int8pack_mm`, the kernel gpt-fast uses); everything else stays fp32. The LoRA factors stay fp32
in the grouped layers on top. Latency and quality against fp32, measured with `benchmarks/serving.py`, are in
the README (Serving, measured): completions keep their facts but may differ in wording from fp32's, and
`serving.precision=fp32` reproduces the evaluation's completions exactly.
"""

from __future__ import annotations

import torch
from torch import nn


class Int8WeightLinear(nn.Module):
    """A frozen Linear with int8 weights and a bf16 scale per output row."""

    weight: torch.Tensor  # the buffers registered below, typed
    scales: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        scales = (weight.abs().amax(dim=1) / 127).clamp(min=1e-12)
        self.register_buffer("weight", torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scales.to(torch.bfloat16))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        y = torch._weight_int8pack_mm(flat, self.weight, self.scales).to(x.dtype)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def int8_supported() -> bool:
    """Whether this torch build runs the int8 weight kernel on the CPU (checked on a tiny matrix)."""
    try:
        probe = Int8WeightLinear(nn.Linear(8, 4))
        probe(torch.zeros(1, 8))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False
    return True


def quantize_linears(model: nn.Module) -> int:
    """Replace every nn.Linear of `model` (lm_head too) by `Int8WeightLinear`; returns how many."""
    linears = [(path, module) for path, module in model.named_modules() if isinstance(module, nn.Linear)]
    for path, linear in linears:
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, name, Int8WeightLinear(linear))
    return len(linears)
