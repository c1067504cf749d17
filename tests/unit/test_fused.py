"""fed_netgpt/model/fused.py: the fused RMSNorm and rotary embedding compute what transformers' do, forward and
backward (the Triton kernels' tests need a GPU: `pytest -m gpu` on a machine with one)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers.models.llama import modeling_llama
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from fed_netgpt.model.base import load_private_base
from fed_netgpt.model.fused import cross_entropy_rows, fused_kernels, rotary


@pytest.mark.parametrize(("dtype", "scale_dtype"), [(torch.float32, torch.float32),
                                                     (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16)])
def test_fused_rms_norm_equals_transformers_forward_and_backward(dtype, scale_dtype) -> None:
    # Prepare: a norm with a non-trivial scale, and its copy
    torch.manual_seed(0)
    norm = LlamaRMSNorm(64, eps=1e-5)
    norm.weight.data = torch.randn(64, dtype=scale_dtype)
    fused = copy.deepcopy(norm)
    x = torch.randn(3, 5, 64, dtype=dtype) * 3
    inputs = [x.clone().requires_grad_(), x.clone().requires_grad_()]

    # Execute
    with fused_kernels(fused):
        outputs = [norm(inputs[0]), fused(inputs[1])]
        grad = torch.randn_like(outputs[0])
        for output in outputs:
            output.backward(grad)

    # Assert: exact where the scale is applied after; with a scale of the input's dtype, rounded once instead of
    # twice (within one rounding of bf16, 2^-8 relative)
    exact = scale_dtype != dtype or dtype == torch.float32
    assert outputs[0].dtype == outputs[1].dtype
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0 if exact else 2**-7, atol=1e-6)
    for got, expected in ((inputs[1].grad, inputs[0].grad), (fused.weight.grad, norm.weight.grad)):
        atol = 1e-5 if exact else 2**-7 * expected.abs().max().item()  # sums of bf16 products cancel
        torch.testing.assert_close(got, expected, rtol=1e-5 if exact else 2**-7, atol=atol)
    wrong = LlamaRMSNorm(64, eps=1e-5)(x)  # another scale is far off: the comparison can fail
    assert not torch.allclose(wrong.float(), outputs[0].float(), atol=1e-2)


def test_inside_the_model_runs_fused_and_after_it_is_as_transformers_made_it() -> None:
    # Prepare
    model = load_private_base("tiny-random").model
    ids = torch.tensor([[1, 20, 300, 4000, 5]])
    norms = [m for m in model.modules() if isinstance(m, LlamaRMSNorm)]
    mlps = [layer.mlp for layer in model.model.layers]
    with torch.no_grad():
        expected = model(input_ids=ids).logits

    # Execute: the compiled MLPs are not run here (compiling on a CI CPU is slow), only checked to be set up
    with fused_kernels(model):
        inside = ({"forward"} <= set(vars(norms[0])), all(m._compiled_call_impl is not None for m in mlps))
        with torch.no_grad(), torch.compiler.set_stance("force_eager"):
            got = model(input_ids=ids).logits

    # Assert: two norms a layer and the final one; everything restored after
    assert len(norms) == 2 * len(mlps) + 1 and inside == (True, True)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert all("forward" not in vars(n) for n in norms) and all(m._compiled_call_impl is None for m in mlps)


def _rotary_inputs(device: str, dtype: torch.dtype, rows_of_angles: int):
    """Queries and keys as the projections' strided views ([rows, heads, positions, 64]), and angle tables."""
    torch.manual_seed(0)
    rows, positions = 3, 17
    q = torch.randn(rows, positions, 9, 64, device=device, dtype=dtype).transpose(1, 2)
    k = torch.randn(rows, positions, 3, 64, device=device, dtype=dtype).transpose(1, 2)
    angles = torch.rand(rows_of_angles, positions, 32, device=device) * 6
    emb = torch.cat([angles, angles], dim=-1)
    return q, k, emb.cos().to(dtype), emb.sin().to(dtype)


def test_rotary_off_a_gpu_is_transformers_own_and_the_swap_is_undone() -> None:
    # Prepare
    q, k, cos, sin = _rotary_inputs("cpu", torch.float32, 1)
    original = modeling_llama.apply_rotary_pos_emb

    # Execute
    got = rotary(q, k, cos, sin)
    with fused_kernels(torch.nn.Linear(2, 2)):
        inside = modeling_llama.apply_rotary_pos_emb

    # Assert
    for a, b in zip(got, original(q, k, cos, sin)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert inside is rotary and modeling_llama.apply_rotary_pos_emb is original


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the rotary kernel runs on a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows_of_angles", [1, 3])
def test_rotary_kernel_equals_transformers_forward_and_backward(dtype, rows_of_angles) -> None:
    # Prepare: transformers' rotary in float64 is the reference for both
    q, k, cos, sin = _rotary_inputs("cuda", dtype, rows_of_angles)
    wide = [t.detach().double().requires_grad_() for t in (q, k)]
    narrow = [t.detach().clone().requires_grad_() for t in (q, k)]
    grads = [torch.randn_like(t) for t in (q, k)]

    # Execute
    expected = modeling_llama.apply_rotary_pos_emb(*wide, cos.double(), sin.double())
    got = rotary(*narrow, cos, sin)
    torch.autograd.backward(expected, [g.double() for g in grads])
    torch.autograd.backward(got, grads)

    # Assert: values and gradients, the layout of a projection's view, and a wrong sign is far off
    tolerance = {"rtol": 0, "atol": 2e-2 if dtype == torch.bfloat16 else 1e-5}
    for g, e, x, w in zip(got, expected, narrow, wide):
        assert g.dtype == dtype and g.stride() == x.stride()
        torch.testing.assert_close(g.double(), e, **tolerance)
        torch.testing.assert_close(x.grad.double(), w.grad, **tolerance)
    wrong = modeling_llama.apply_rotary_pos_emb(q, k, cos, -sin)[0]
    assert not torch.allclose(wrong.double(), expected[0], atol=0.1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the cross-entropy kernel runs on a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [100, 49152, 50001])  # shorter than a block, whole blocks, a ragged last block
def test_cross_entropy_kernel_equals_log_softmax_in_float64(dtype, vocab) -> None:
    # Prepare: logits of a wide range, targets at both ends of the vocabulary and in between
    torch.manual_seed(0)
    logits = (torch.randn(37, vocab, device="cuda") * 8).to(dtype)
    targets = torch.randint(0, vocab, (37,), device="cuda")
    targets[:2] = torch.tensor([0, vocab - 1])
    logp = torch.log_softmax(logits.double(), dim=-1)
    expected_grad = logp.exp().scatter_add(1, targets[:, None], -torch.ones(37, 1, device="cuda", dtype=torch.float64))

    # Execute
    losses_only, none = cross_entropy_rows(logits.clone(), targets, grad=False)
    losses, grad = cross_entropy_rows(logits.clone(), targets, grad=True)

    # Assert: losses in fp32 accuracy, the gradient within one step of its dtype (|p| <= 1); another target is far off
    expected = -logp.gather(1, targets[:, None]).squeeze(1)
    assert none is None and losses.dtype == torch.float32 and grad.dtype == dtype
    for got in (losses_only, losses):
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-4)
    tolerance = {"rtol": 0, "atol": 2**-7} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-6}  # GPU's exp
    torch.testing.assert_close(grad.double(), expected_grad, **tolerance)
    shifted = cross_entropy_rows(logits.clone(), (targets + 1) % vocab, grad=False)[0]
    assert (shifted.double() - expected).abs().max() > 1
