"""fed_netgpt/fused.py: the fused RMSNorm computes what transformers' does, forward and backward."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from fed_netgpt.fused import fused_kernels
from fed_netgpt.models import load_private_base


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rms_norm_equals_transformers_forward_and_backward(dtype) -> None:
    # Prepare: a norm with a non-trivial scale, and its copy
    torch.manual_seed(0)
    norm = LlamaRMSNorm(64, eps=1e-5)
    norm.weight.data = torch.randn(64)
    fused = copy.deepcopy(norm)
    x = torch.randn(3, 5, 64, dtype=dtype) * 3
    inputs = [x.clone().requires_grad_(), x.clone().requires_grad_()]

    # Execute
    with fused_kernels(fused):
        outputs = [norm(inputs[0]), fused(inputs[1])]
        grad = torch.randn_like(outputs[0])
        for output in outputs:
            output.backward(grad)

    # Assert
    assert outputs[0].dtype == outputs[1].dtype
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(inputs[1].grad, inputs[0].grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused.weight.grad, norm.weight.grad, rtol=1e-5, atol=1e-5)
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
