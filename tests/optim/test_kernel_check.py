"""The check a compiled CompensatedAdamW kernel passes before its first use: a wrong kernel is never used."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from lightning_precision import _logging
from lightning_precision.optim import CompensatedAdamW, _compiled_step
from lightning_precision.optim._inductor_codegen import step_inductor
from lightning_precision.optim._kernel_check import KernelMismatch, check_kernel, difference
from tests.optim._kernel_arguments import kernel_arguments

pytestmark = pytest.mark.skipif(
    _compiled_step.compiler_missing(torch.device("cpu")) is not None,
    reason=f"the compiled step cannot compile here: {_compiled_step.compiler_missing(torch.device('cpu'))}",
)
BF16 = torch.bfloat16


@pytest.fixture(autouse=True, scope="module")
def _fresh_dynamo():
    # Dynamo allows 8 compiled variants per code object and process; this module's templates add their own to those
    # the other optimizer tests compiled in the same pytest process.
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _folded_step(*args) -> None:
    # A code object of its own: its compiles do not count against the library kernel's recompile limit.
    _compiled_step._kernel(*args)


def _folded_kernel():
    # The upstream trap: without emulate_precision_casts inductor may fold t - float(bf16(t)) to 0.
    return torch.compile(_folded_step, backend=step_inductor({}), dynamic=True, fullgraph=True)


@pytest.mark.parametrize(("rows", "stochastic"), [(False, False), (False, True), (True, True)])
def test_the_compiled_kernel_passes_the_check(rows, stochastic):
    check_kernel(_compiled_step._compiled_kernel(rows), _compiled_step.eager_kernel, kernel_arguments(rows, stochastic))


def test_a_kernel_that_folds_the_rounding_fails_the_check_naming_the_compensation():
    try:
        check_kernel(_folded_kernel(), _compiled_step.eager_kernel, kernel_arguments(False, False))
    except KernelMismatch as error:
        assert "compensation" in str(error) and "differ bitwise" in str(error)
    else:
        pytest.skip("this torch's inductor keeps the bf16 rounding without emulate_precision_casts")


def _state(seed: int) -> tuple:
    gen = torch.Generator().manual_seed(seed)
    p = torch.randn(64, generator=gen).to(BF16)
    c = (torch.randn(64, generator=gen) * 1e-3).to(BF16)
    return p, None, torch.randn(64, generator=gen), torch.rand(64, generator=gen), c


def test_off_cpu_an_ulp_of_difference_passes_but_a_lost_compensation_does_not():
    want = _state(0)
    ulp_off = list(want)
    ulp_off[2] = want[2].nextafter(torch.full_like(want[2], 2.0))  # one fp32 ulp in every exp_avg element
    assert difference(tuple(ulp_off), want, exact=False) is None
    assert "exp_avg: 64 of 64 elements differ bitwise" in difference(tuple(ulp_off), want, exact=True)
    lost = (*want[:4], torch.zeros_like(want[4]))
    assert "parameter + compensation" in difference(lost, want, exact=False)


def test_a_step_whose_kernel_fails_the_check_runs_the_eager_step_and_warns(monkeypatch):
    try:
        check_kernel(_folded_kernel(), _compiled_step.eager_kernel, kernel_arguments(False, False))
        pytest.skip("this torch's inductor keeps the bf16 rounding without emulate_precision_casts")
    except KernelMismatch:
        pass
    _logging.reset_reported()
    folded = _folded_kernel()
    monkeypatch.setattr(_compiled_step, "_compiled_kernel", lambda rows=False: folded)
    for name, fresh in (("_checked", set()), ("_failed", {})):
        monkeypatch.setattr(_compiled_step, name, fresh)
    results = []
    for implementation in ("compiled", "chunked"):
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(BF16)) for s in ((2**15,), (40,), (7,))]
        opt = CompensatedAdamW(params, lr=1e-3, implementation=implementation, exp_avg_sq_dtype="float32")
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            for _ in range(3):
                for p in params:
                    p.grad = (torch.randn(p.shape, generator=gen) * 1e-2).to(BF16)
                opt.step()
        results.append((params, opt, [str(w.message) for w in record]))
    said = [m for m in results[0][2] if "did not match the eager step" in m]
    assert len(said) == 1 and "compensation" in said[0]  # once, naming what differed
    for p, r in zip(results[0][0], results[1][0]):
        assert torch.equal(p, r)
        assert torch.equal(results[0][1].state[p]["compensation"], results[1][1].state[r]["compensation"])


def test_a_kernel_refused_by_dynamos_recompile_limit_leaves_the_step_to_the_eager_one(monkeypatch):
    # A new variant (here: weight decay switched off, a constant of the kernel) past dynamo's limit fails to compile
    # while the bucket's kernels are checked, before any write: the eager step takes over instead of a crash.
    torch._dynamo.reset()
    _logging.reset_reported()
    for name, fresh in (("_checked", set()), ("_failed", {})):
        monkeypatch.setattr(_compiled_step, name, fresh)
    # torch's config patch, not monkeypatch: monkeypatch's undo deletes a torch config entry.
    with torch._dynamo.config.patch(recompile_limit=1):
        results = [_three_steps_switching_weight_decay(i) for i in ("compiled", "chunked")]
    torch._dynamo.reset()
    assert any("torch.compile failed" in m for m in results[0][2])
    (p, opt, _), (r, ref, _) = results
    assert torch.equal(p, r) and torch.equal(opt.state[p]["compensation"], ref.state[r]["compensation"])


def _three_steps_switching_weight_decay(implementation: str) -> tuple:
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(2**15, generator=gen).to(BF16))]
    opt = CompensatedAdamW(params, lr=1e-3, weight_decay=0.1, implementation=implementation)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for step in range(3):
            params[0].grad = (torch.randn(2**15, generator=gen) * 1e-2).to(BF16)
            if step == 1:
                opt.param_groups[0]["weight_decay"] = 0.0
            opt.step()
    return params[0], opt, [str(w.message) for w in record]


def test_a_kernel_first_compiled_on_the_checks_few_elements_is_still_shared_out_over_threads():
    # The check compiles each kernel on a handful of elements: inductor must not take that size as the kernel's and
    # leave the loop to one thread (the step then ran single-threaded on every machine).
    torch._dynamo.reset()
    _, code = run_and_get_code(_compiled_step._compiled_kernel(False), *kernel_arguments(False, True))
    assert "#pragma omp parallel" in "\n".join(code)
