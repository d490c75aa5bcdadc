"""Every BRA backend × dtype × device × mode either runs and equals the reference, or is refused with its
reasons (NotImplementedError naming the backend): never another exception (issue 11, item 3)."""

import pytest
import torch

import attentions
from attentions import bra_kernels

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
DEVICES = ("cpu", *(("cuda",) if torch.cuda.is_available() else ()))
MODES = ("forward", "forward_backward")
# max |out - reference| relative to max(|reference|, 1): the reference is the float64 plain path of the same
# (dtype-rounded) weights on the same (dtype-rounded) input with the backend's routed regions imposed (a near-tie
# may route otherwise in half precision), so only the backend's arithmetic differs
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 5e-2, torch.float16: 1e-2}
COMPILED = {name for name, backend in bra_kernels.BACKENDS.items() if backend.compiled}


def _impl_params() -> list:
    return [pytest.param(impl, marks=pytest.mark.slow) if impl in COMPILED else impl for impl in bra_kernels.IMPLS]


def _close(actual: torch.Tensor, expected: torch.Tensor, tolerance: float, what: str) -> None:
    error = (actual.double().cpu() - expected).abs().max().item()
    scale = max(expected.abs().max().item(), 1.0)
    assert error <= tolerance * scale, f"{what}: max abs error {error:.3g} > {tolerance:g} × {scale:.3g}"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("impl", _impl_params())
def test_runs_and_matches_or_is_refused_with_reasons(impl, dtype, device, mode):
    torch.manual_seed(0)
    module = attentions.create("bra", dim=32, num_heads=4, n_win=4, topk=3, side_dwconv=3, impl=impl)
    for parameter in module.parameters():
        torch.nn.init.normal_(parameter, std=0.2)
    module = module.to(device=device, dtype=dtype)
    reference = module.plain().to(device="cpu", dtype=torch.float64)
    x = torch.randn(2, 8, 8, 32, device=device, dtype=dtype, requires_grad=mode == "forward_backward")
    declared = module.not_supported_reasons(torch.device(device), dtype)
    module.router.recorded_choices = []
    try:
        with torch.set_grad_enabled(mode == "forward_backward"):
            out = module(x)
            if mode == "forward_backward":
                grad = torch.randn_like(out)
                out.backward(grad)
    except NotImplementedError as refusal:
        assert f"bra impl={impl!r}" in str(refusal) and ": " in str(refusal), str(refusal)
        return
    assert not declared, f"{impl} declared {declared} for {device}/{dtype} but ran"
    reference.router.imposed_choices = [torch.cat(module.router.recorded_choices).cpu()]
    x_ref = x.detach().double().cpu().requires_grad_(mode == "forward_backward")
    with torch.set_grad_enabled(mode == "forward_backward"):
        expected = reference(x_ref)
    tolerance = TOLERANCE[dtype]
    assert reference.router.imposed_shortfall <= tolerance, "an imposed route is not a near-tie in float64"
    _close(out, expected.detach(), tolerance, "output")
    if mode == "forward_backward":
        expected.backward(grad.double().cpu())
        _close(x.grad, x_ref.grad, tolerance, "input grad")
        for (name, p), p_ref in zip(module.named_parameters(), reference.parameters(), strict=True):
            _close(p.grad, p_ref.grad, tolerance, f"grad of {name}")
