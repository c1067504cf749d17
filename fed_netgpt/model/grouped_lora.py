"""Many LoRA adapters in one forward pass: each row of a batch uses its own adapter.

The adapters of a layer are stacked, `A [K, r, in]` and `B [K, out, r]`; a row picks its adapter by index and
the low-rank update is two batched matmuls. Used for training several sites' adapters in one forward/backward
over the shared frozen base (`fed_netgpt.training.engine.train_sites`) and for serving a batch whose rows belong to
different sites. peft's own mixed-adapter batch (`adapter_names=`) loops over adapters in Python and refuses
training; this layer does neither.

Module surgery is temporary: `grouped_adapters(model, ...)` swaps the target Linear layers (or the Linear
inside a peft LoRA layer) for `GroupedLoraLinear` and puts the originals back on exit, so the process-wide
frozen base and its peft adapters are untouched. States go in and out in peft's key format (the same
`AdapterState` as `fed_netgpt.model.adapters`), so a slice is a normal peft adapter.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fed_netgpt.config import LoraConfig
from fed_netgpt.model.adapters import AdapterError, AdapterState, describe_mismatch

PEFT_PREFIX = "base_model.model."


class RowSelection:
    """Which adapter each row of the next forward pass uses, shared by every grouped layer of a model.

    `blocks` is set when the rows are K equal runs in adapter order (row i uses adapter i // rows_per_adapter,
    with all K adapters present): the layers then reshape instead of gathering each row's factors. `single` is
    set when every row uses one adapter (a lone request while serving): two plain matmuls with its factors.
    """

    def __init__(self) -> None:
        self.index: torch.Tensor | None = None
        self.blocks = False
        self.single: int | None = None
        self.row_gradients: RowGradients | None = None  # set: DP-SGD, each row's gradient kept, not summed

    def set(self, index: torch.Tensor, num_adapters: int) -> None:
        self.index = index
        rows = index.numel()
        per = rows // num_adapters if num_adapters else 0
        on_host = index.cpu()
        self.blocks = per * num_adapters == rows and bool(
            torch.equal(on_host, torch.arange(num_adapters).repeat_interleave(per)))
        self.single = int(on_host[0]) if rows and not self.blocks and bool((on_host == on_host[0]).all()) else None


class FrozenLinear(Protocol):
    """What grouped LoRA needs of the layer it adapts: an nn.Linear, or serving's `Int8WeightLinear`."""

    @property
    def in_features(self) -> int: ...
    @property
    def out_features(self) -> int: ...
    @property
    def weight(self) -> torch.Tensor: ...
    @property
    def bias(self) -> torch.Tensor | None: ...
    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


class GroupedLoraLinear(nn.Module):
    """A frozen Linear plus K stacked LoRA adapters: y = base(x) + scaling · B_k A_k dropout(x), k per row."""

    def __init__(self, base: FrozenLinear, num_adapters: int, r: int, alpha: float, dropout: float,
                 selection: RowSelection) -> None:
        super().__init__()
        self.base = base
        # fp32 master weights under a bf16/fp16 base (as peft keeps them); a float64 base keeps float64
        device, dtype = base.weight.device, torch.promote_types(base.weight.dtype, torch.float32)
        self.lora_A = nn.Parameter(torch.zeros(num_adapters, r, base.in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(num_adapters, base.out_features, r, device=device, dtype=dtype))
        self.scaling = alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.selection = selection

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, *inner, width = x.shape
        out = self.base(x)
        h = self.dropout(x).reshape(rows, -1, width)
        # scaling folded into B (exact for the usual alpha = 2r), so the update is added inside the second matmul:
        # baddbmm writes base + B·(A·h) in one pass instead of three (product, scaling, sum)
        if self.selection.row_gradients is not None and torch.is_grad_enabled():
            if not self.selection.blocks:
                raise RuntimeError("per-row gradients need the rows as K equal runs in adapter order")
            update = _RowGradientUpdate.apply(h, self.selection.row_gradients, (self,), self.lora_A, self.lora_B)
            return out + update.view_as(out)
        a, b = self.lora_A.to(h.dtype), (self.scaling * self.lora_B).to(h.dtype)
        if self.selection.single is not None:  # one adapter for every row
            k = self.selection.single
            return torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, width) @ a[k].T, b[k].T).view_as(out)
        if self.selection.blocks:  # K equal runs: [K, rows/K·T, in] against the stacks themselves
            k = a.shape[0]
            low = torch.bmm(h.reshape(k, -1, width), a.transpose(1, 2))
            return torch.baddbmm(out.reshape(k, -1, out.shape[-1]), low, b.transpose(1, 2)).view_as(out)
        # any order: each row gathers its own factors (the index is read only here: a compiled layer taking the
        # paths above then has no input whose shape changes with the batch)
        index = self.selection.index
        if index is None:
            raise RuntimeError("GroupedLoraLinear: no row selection set for this forward pass")
        low = torch.bmm(h, a[index].transpose(1, 2))
        return torch.baddbmm(out.reshape(rows, -1, out.shape[-1]), low, b[index].transpose(1, 2)).view_as(out)


class RowGradients:
    """Each row's gradient of every trained factor, kept by the grouped layers' backward pass, and each row's
    gradient norm over all of them: what DP-SGD clips, one row (one prompt pair) at a time, before anything is
    summed. A row's gradient of a LoRA factor is small (r x width), so keeping them all costs little memory.
    """

    def __init__(self, trained: Sequence[nn.Parameter]) -> None:
        self.order = {id(p): i for i, p in enumerate(trained)}  # what `clipped_sums` follows, whatever the backward
        self.grads: dict[nn.Parameter, torch.Tensor] = {}  # parameter -> [rows, *its shape per adapter]
        self.norms: list[torch.Tensor] = []  # each kept gradient's norm per row

    def trains(self, param: nn.Parameter) -> bool:
        return id(param) in self.order

    def clear(self) -> None:
        """Drop what a backward pass kept (a timing pass's gradients, before training starts)."""
        self.grads, self.norms = {}, []

    def keep(self, param: nn.Parameter, per_row: torch.Tensor) -> None:
        """Called by the backward pass: `per_row[i]` is row i's gradient of `param`'s (row's adapter's) slice."""
        if not self.trains(param):
            return
        per_row = per_row.to(param.dtype)
        self.grads[param] = per_row
        self.norms.append(torch.linalg.vector_norm(per_row.flatten(1), dim=1))

    def row_norms(self) -> torch.Tensor:
        """Each row's gradient norm over every kept factor ([rows])."""
        if not self.norms:
            raise RuntimeError("no per-row gradients kept: run a backward pass first")
        return torch.linalg.vector_norm(torch.stack(self.norms), dim=0)

    def clipped_sums(self, max_norm: float, num_adapters: int) -> dict[nn.Parameter, torch.Tensor]:
        """Every row's gradient scaled to norm at most `max_norm` (Opacus's rule: factor
        min(1, max_norm / (norm + 1e-6))), then summed over the rows of each adapter: `[K, *shape]` a parameter.
        The kept gradients are dropped; the sums come in the order of the trained factors."""
        factor = (max_norm / (self.row_norms() + 1e-6)).clamp(max=1.0).view(num_adapters, -1)
        kept = sorted(self.grads.items(), key=lambda item: self.order[id(item[0])])  # the trained factors' order
        sums = {p: torch.einsum("kn,kn...->k...", factor.to(g.dtype), g.view(num_adapters, -1, *g.shape[1:]))
                for p, g in kept}
        self.clear()
        return sums


class _RowGradientUpdate(torch.autograd.Function):
    """The low-rank update of one grouped layer, or of a `SharedInputProjection`'s layers side by side (A stacked,
    B block-diagonal), over rows as K equal runs, whose backward pass hands each row's gradient of every A and B to
    a `RowGradients` instead of summing them into `.grad` (the input's gradient flows as usual).

    With u = A·h and the update s·B·u: row i's gradient of B is s·Σ_t g_t u_tᵀ, of A Σ_t (s·Bᵀg_t) h_tᵀ, over
    its own positions t: two batched matmuls a layer with the rows as the batch.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, sink: RowGradients, layers: tuple[GroupedLoraLinear, ...],
                *factors: nn.Parameter) -> torch.Tensor:  # the factors as inputs: the output needs a gradient
        # even where h has none (the first layer's input, the frozen embeddings)
        device = h.device.type  # autocast's dtype chosen here, so that the backward pass computes in the same
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
        ctx.input_dtype = h.dtype
        h = h.to(dtype)
        a, b = _joined_factors(layers, dtype)
        with torch.autocast(device, enabled=False):
            low = torch.bmm(h.reshape(a.shape[0], -1, h.shape[-1]), a.transpose(1, 2))  # [K, rows/K·T, Σr]
            update = torch.bmm(low, b.transpose(1, 2))
        ctx.save_for_backward(h, low, a, b)
        ctx.layers, ctx.sink = layers, sink
        return update

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        h, low, a, b = ctx.saved_tensors
        grad = grad.to(h.dtype)
        grad_low = torch.bmm(grad, b)  # [K, rows/K·T, Σr]
        grad_h = torch.bmm(grad_low, a).view_as(h).to(ctx.input_dtype)
        per_row = (h.shape[0], h.shape[1], -1)  # [rows, T, ·]
        grad, low, grad_low = grad.reshape(per_row), low.reshape(per_row), grad_low.reshape(per_row)
        outs = ranks = 0
        for layer in ctx.layers:
            (out, r), sink = layer.lora_B.shape[1:], ctx.sink
            own_out, own_rank = slice(outs, outs + out), slice(ranks, ranks + r)
            sink.keep(layer.lora_B, layer.scaling * torch.bmm(grad[..., own_out].transpose(1, 2), low[..., own_rank]))
            if sink.trains(layer.lora_A):  # not under FFA-LoRA, whose A stays frozen
                sink.keep(layer.lora_A, torch.bmm(grad_low[..., own_rank].transpose(1, 2), h))
            outs, ranks = outs + out, ranks + r
        return (grad_h, None, None, *[None] * (2 * len(ctx.layers)))


def _joined_factors(layers: Sequence[GroupedLoraLinear], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The layers' A stacked ([K, Σr, in]) and their B, scaling folded in, laid block-diagonally ([K, Σout, Σr]), in
    `dtype`: several layers of one input as one low-rank update (one layer: its own A and s·B)."""
    a = torch.cat([layer.lora_A for layer in layers], dim=1).to(dtype)
    return a, _block_diagonal([layer.scaling * layer.lora_B for layer in layers]).to(dtype)


def _block_diagonal(blocks: Sequence[torch.Tensor]) -> torch.Tensor:
    """[K, out_i, r_i] blocks as one [K, Σout, Σr], zero off the diagonal: several layers' B in one matmul."""
    if len(blocks) == 1:
        return blocks[0]
    total, at, padded = sum(block.shape[2] for block in blocks), 0, []
    for block in blocks:
        padded.append(F.pad(block, (at, total - at - block.shape[2])))
        at += block.shape[2]
    return torch.cat(padded, dim=1)


@dataclass
class GroupedAdapters:
    """The grouped layers of a model (by module path) and the row selection they share."""

    layers: dict[str, GroupedLoraLinear]
    selection: RowSelection
    num_adapters: int

    def select(self, index: torch.Tensor) -> None:
        """Row i of the next forward pass uses adapter index[i]."""
        self.selection.set(index, self.num_adapters)

    @contextlib.contextmanager
    def per_row_gradients(self, trained: Sequence[nn.Parameter]) -> Iterator[RowGradients]:
        """Inside, backward passes keep each row's gradient of the `trained` factors (and set no `.grad`)."""
        self.selection.row_gradients = RowGradients(trained)
        try:
            yield self.selection.row_gradients
        finally:
            self.selection.row_gradients = None

    def parameters(self, freeze_lora_a: bool = False) -> list[nn.Parameter]:
        """The stacked factors to train (B only under FFA-LoRA)."""
        return [p for layer in self.layers.values()
                for p in ((layer.lora_B,) if freeze_lora_a else (layer.lora_A, layer.lora_B))]

    def load(self, states: Sequence[AdapterState]) -> None:
        """Adapter k starts as `states[k]` (peft keys); a missing, extra, misshapen or non-finite tensor is an
        `AdapterError` naming it, raised before training starts. A state given for several adapters (the regional
        adapter every site of a region starts from) is staged and copied once, then repeated on the device."""
        if len(states) != self.num_adapters:
            raise ValueError(f"{self.num_adapters} grouped adapters, {len(states)} states given")
        factors = self.factors()
        expected = {key: tuple(param.shape[1:]) for key, param in factors.items()}
        distinct = list({id(state): state for state in states}.values())
        first = next(iter(factors.values()))
        staged = _staged(expected, distinct, first.dtype, pin=first.device.type == "cuda")
        finite = False
        if staged is not None:
            slot = {id(state): i for i, state in enumerate(distinct)}
            index = (None if len(distinct) == len(states) else
                     torch.tensor([slot[id(state)] for state in states], device=first.device))
            with torch.no_grad():
                for key, param in factors.items():
                    source = staged[key].to(param.device, non_blocking=True)
                    param.copy_(source if index is None else source[index])
                finite = bool(torch.stack([torch.isfinite(p).all() for p in factors.values()]).all())  # one wait
        if not finite:
            problems = ((k, describe_mismatch(expected, state)) for k, state in enumerate(states))
            k, problem = next((k, p) for k, p in problems if p)
            raise AdapterError(f"adapter {k}: {problem}")

    def states(self) -> list[AdapterState]:
        """Every adapter in peft's key format, as NumPy views into one host copy of all the stacked master weights
        (float32; float64 stays), laid out adapter after adapter: adapter k's arrays are slices of one contiguous
        block. The stacks are joined on the device and cross in one copy, into page-locked memory on a GPU (for
        128 sites on SmolLM2, 472 MB: 9 ms, against 0.06-0.4 s into fresh pageable memory)."""
        factors = self.factors()
        flat = torch.cat([param.detach().reshape(self.num_adapters, -1) for param in factors.values()], dim=1)
        host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True).copy_(flat) if flat.is_cuda else flat
        arrays = host.numpy()
        states: list[AdapterState] = [{} for _ in range(self.num_adapters)]
        offset = 0
        for key, param in factors.items():
            size = param[0].numel()  # each adapter's view taken by iterating one [K, *shape] view: 2x faster
            for state, view in zip(states, arrays[:, offset : offset + size].reshape(param.shape)):
                state[key] = view
            offset += size
        return states

    def factors(self) -> dict[str, nn.Parameter]:
        """Every stacked factor by its peft key."""
        return {_key(path, name): getattr(layer, name) for path, layer in self.layers.items()
                for name in ("lora_A", "lora_B")}


def _staged(expected: dict[str, tuple[int, ...]], states: Sequence[AdapterState], dtype: torch.dtype,
            pin: bool) -> dict[str, torch.Tensor] | None:
    """Each key's tensors of all `states` stacked in one host buffer, or None if a state lacks a key, has an extra
    one or a misshapen tensor (`describe_mismatch` then says which). Page-locked when `pin`: torch keeps freed
    page-locked blocks for reuse, so a call's stacking writes into memory already mapped, and copies from it to
    the GPU run at full speed without waiting (stacking 128 adapters into fresh memory took 0.13-0.34 s)."""
    if any(state.keys() != expected.keys() for state in states):
        return None
    if any(np.shape(state[key]) != shape for state in states for key, shape in expected.items()):
        return None
    sizes = {key: len(states) * math.prod(shape) for key, shape in expected.items()}
    buffer = torch.empty(sum(sizes.values()), dtype=dtype, pin_memory=pin)
    staged, offset = {}, 0
    for key, shape in expected.items():
        block = buffer[offset : offset + sizes[key]].view(len(states), *shape)
        np.stack([np.asarray(state[key]) for state in states], out=block.numpy())
        staged[key] = block
        offset += sizes[key]
    return staged


def _key(path: str, name: str) -> str:
    """peft's state-dict key of a layer's factor (as saved in adapter_model.safetensors)."""
    return f"{PEFT_PREFIX}{path}.{name}.weight"


def lora_shapes(model: nn.Module, lora: LoraConfig) -> dict[str, tuple[int, ...]]:
    """The peft keys and shapes of one adapter of `lora` on `model` (what a loaded state must match)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for path, linear in target_linears(model, lora.target_modules).items():
        shapes[_key(path, "lora_A")] = (lora.r, linear.in_features)
        shapes[_key(path, "lora_B")] = (linear.out_features, lora.r)
    return shapes


def target_linears(model: nn.Module, target_modules: Sequence[str]) -> dict[str, FrozenLinear]:
    """The frozen Linear layers LoRA adapts, by module path (peft's rule: the path ends with a target name).
    Inside a peft LoRA layer the Linear is its `base_layer`; a quantized Linear with `in_features`,
    `out_features` and a `weight` (serving's int8 layers) works as well."""
    found: dict[str, FrozenLinear] = {}
    for path, module in model.named_modules():
        if path.split(".")[-1] not in target_modules:
            continue
        linear = getattr(module, "base_layer", module)
        if isinstance(linear, GroupedLoraLinear):  # already grouped (serving reloads): the Linear underneath
            linear = linear.base
        if not (hasattr(linear, "in_features") and hasattr(linear, "out_features")):
            raise TypeError(f"{path} is a {type(linear).__name__}; grouped LoRA adapts Linear layers only")
        found[path] = linear
    if not found:
        raise ValueError(f"no module of the model matches lora.target_modules={list(target_modules)}")
    return found


SHARED_INPUTS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # LLaMA's projections of one input


class SharedInputProjection:
    """Sibling grouped layers that project one input (LLaMA's q, k and v; gate and up) computed as one: one matmul
    against their concatenated weights, one low-rank product against their concatenated A, one against their B
    laid block-diagonally, then split. The input is read once instead of once a layer, and its gradient is one
    matmul instead of a sum of one a layer. Used where the rows are K equal runs with no dropout (a grouped
    training pass, under DP-SGD too); anything else runs each layer alone. The attention block calls its
    projections one after another with the same tensor: the first computes all, the others take their part."""

    def __init__(self, layers: Sequence[GroupedLoraLinear]) -> None:
        self.layers = list(layers)
        bases = [layer.base for layer in layers]
        self.weight = torch.cat([base.weight for base in bases])
        biases = [base.bias for base in bases if base.bias is not None]
        self.bias = torch.cat(biases) if len(biases) == len(bases) else None
        self.sizes = [base.weight.shape[0] for base in bases]
        self._input: torch.Tensor | None = None
        self._parts: list[torch.Tensor | None] = []

    def applies(self) -> bool:
        """Whether this pass can run as one: rows as K equal runs and no dropout."""
        return self.layers[0].selection.blocks and all(isinstance(layer.dropout, nn.Identity) for layer in self.layers)

    def part(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """Layer i's output for input `x`: all layers' computed on the first call for this `x`."""
        out = self._parts[i] if self._input is x else None
        if out is None:
            parts = self._all(x)
            self._input, self._parts, out = x, list(parts), parts[i]
        self._parts[i] = None
        if not any(p is not None for p in self._parts):
            self._input = None  # nothing is kept once every layer has its part
        return out

    def _all(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        layers, k, width = self.layers, self.layers[0].lora_A.shape[0], x.shape[-1]
        out = F.linear(x, self.weight, self.bias)
        sink = layers[0].selection.row_gradients
        if sink is not None and torch.is_grad_enabled():  # DP-SGD: each row's gradient of every factor kept
            factors = [factor for layer in layers for factor in (layer.lora_A, layer.lora_B)]
            update = _RowGradientUpdate.apply(x.reshape(x.shape[0], -1, width), sink, tuple(layers), *factors)
            fused = out + update.view_as(out)
        else:
            a, b = _joined_factors(layers, x.dtype)
            low = torch.bmm(x.reshape(k, -1, width), a.transpose(1, 2))
            fused = torch.baddbmm(out.reshape(k, -1, out.shape[-1]), low, b.transpose(1, 2)).view_as(out)
        return fused.split(self.sizes, dim=-1)


class _SharedInputMember(nn.Module):
    """Stands where grouped layer `index` of a `SharedInputProjection` was, and answers for it."""

    def __init__(self, shared: SharedInputProjection, index: int) -> None:
        super().__init__()
        self.layer = shared.layers[index]
        self.shared, self.index = shared, index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared.part(x, self.index) if self.shared.applies() else self.layer(x)


def shared_input_groups(paths: Sequence[str]) -> list[list[str]]:
    """The target paths that project one input (`SHARED_INPUTS` under one parent), in that order."""
    by_name = {path: path.rpartition(".") for path in paths}
    groups = []
    for names in SHARED_INPUTS:
        parents = {parent for parent, _, name in by_name.values() if name == names[0]}
        for parent in sorted(parents):
            group = [f"{parent}.{name}" if parent else name for name in names]
            if all(path in by_name for path in group):
                groups.append(group)
    return groups


@contextlib.contextmanager
def grouped_adapters(model: nn.Module, lora: LoraConfig, num_adapters: int,
                     fuse_shared_inputs: bool = False) -> Iterator[GroupedAdapters]:
    """Swap the model's target layers for `GroupedLoraLinear` (zero adapters) for the block; restore them after.
    `fuse_shared_inputs`: sibling layers of one input run as one `SharedInputProjection` where they can."""
    selection = RowSelection()
    originals: dict[str, nn.Module] = {}
    layers: dict[str, GroupedLoraLinear] = {}
    for path, linear in target_linears(model, lora.target_modules).items():
        layers[path] = GroupedLoraLinear(linear, num_adapters, lora.r, lora.alpha, lora.dropout, selection)
        originals[path] = model.get_submodule(path)
    installed: dict[str, nn.Module] = dict(layers)
    if fuse_shared_inputs:
        for group in shared_input_groups(list(layers)):
            shared = SharedInputProjection([layers[path] for path in group])
            installed.update({path: _SharedInputMember(shared, i) for i, path in enumerate(group)})
    try:
        for path, module in installed.items():
            _replace(model, path, module)
        yield GroupedAdapters(layers, selection, num_adapters)
    finally:
        for path, module in originals.items():
            _replace(model, path, module)


def _replace(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)
