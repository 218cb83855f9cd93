"""Every op of memit_fast.ops: torch.library.opcheck (schema, fake, dispatch, mutation) on the CPU
and on CUDA, and torch.compile(fullgraph=True) of a function that calls it."""

import pytest
import torch

from memit_fast import ops, solve

LAM = 15000.0


def spd(d, device):
    x = torch.randn(3 * d, d, dtype=torch.float64, device=device)
    return x.mT @ x / (3 * d) + 0.05 * torch.eye(d, dtype=torch.float64, device=device)


CASES = {  # op and the builder of its arguments on a device
    "gather_rows": ("gather_rows", lambda dev: (torch.randn(2, 5, 16, device=dev), torch.tensor([9, 0, 4], device=dev),
                                                torch.empty(3, 16, device=dev))),
    "covariance_update": ("covariance_update", lambda dev: (
        torch.zeros(24, 24, device=dev), torch.randn(40, 24, device=dev).bfloat16(), torch.tensor([3, 1, 7, 20], device=dev),
        torch.tensor([3], dtype=torch.int32, device=dev), True)),
    "covariance_update-all-rows": ("covariance_update", lambda dev: (torch.zeros(24, 24, device=dev), torch.randn(40, 24, device=dev))),
    "gram": ("gram", lambda dev: ([torch.randn(30, 20, device=dev), torch.randn(30, 8, device=dev)],)),
    "factor_scaled_cov": ("factor_scaled_cov", lambda dev: (torch.stack([spd(9, dev), spd(9, dev)]), LAM, torch.float64)),
    "solve_cholesky": ("solve_cholesky", lambda dev: (spd(9, dev), torch.randn(9, 4, device=dev), LAM, torch.float64)),
    "solve_cholesky-delta": ("solve_cholesky", lambda dev: (spd(9, dev), torch.randn(9, 4, device=dev), LAM, torch.float64,
                                                             torch.randn(2, 4, device=dev), 4, 4)),
    "solve_mixed-delta": ("solve_mixed", lambda dev: (spd(9, dev), torch.randn(9, 4, device=dev), LAM, torch.float64,
                                                       torch.randn(2, 4, device=dev))),
    "solve_woodbury": ("solve_woodbury", lambda dev: (solve.factor_scaled_cov(spd(9, dev), LAM), torch.randn(9, 4, device=dev),
                                                       torch.float64)),
    "solve_woodbury-delta": ("solve_woodbury", lambda dev: (solve.factor_scaled_cov(spd(9, dev), LAM), torch.randn(9, 4, device=dev),
                                                             torch.float64, torch.randn(3, 4, device=dev), 4)),
}
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def test_every_op_has_a_case():
    declared = {name for name in dir(torch.ops.memit_fast) if not name.startswith("_") and hasattr(getattr(torch.ops.memit_fast, name), "default")}
    assert declared == {op for op, _ in CASES.values()}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(CASES))
def test_opcheck(case, device):
    name, args = CASES[case]
    torch.library.opcheck(getattr(torch.ops.memit_fast, name).default, args(device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(CASES))
def test_compiles_fullgraph(case, device):
    name, args = CASES[case]
    op = getattr(torch.ops.memit_fast, name)

    def call(*a):
        return op(*a)

    torch._dynamo.reset()
    eager_args = args(device)
    compiled_args = [a.clone() if isinstance(a, torch.Tensor) else a for a in eager_args]
    want = call(*eager_args)
    got = torch.compile(call, fullgraph=True, backend="inductor")(*compiled_args)  # CPU: inductor's C++
    if want is None:  # a mutating op: compare the mutated arguments
        want, got = [a for a in eager_args if isinstance(a, torch.Tensor)], [a for a in compiled_args if isinstance(a, torch.Tensor)]
        want, got = torch.cat([w.flatten().double() for w in want]), torch.cat([g.flatten().double() for g in got])
    assert torch.allclose(got.double(), want.double(), rtol=1e-12, atol=0, equal_nan=True)


def test_python_front_checks_before_the_op():
    with pytest.raises(ValueError, match="need hidden"):
        ops.gather_rows(torch.randn(2, 3, 4), torch.tensor([[0]]))
