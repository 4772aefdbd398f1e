"""The compiled CompensatedAdamW step: bitwise the eager step, no recompiles, and a loud fallback."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch._dynamo.utils
from torch._inductor.graph import GraphLowering

from lightning_precision import _logging
from lightning_precision.errors import PrecisionWarning
from lightning_precision.optim import CompensatedAdamW, _compiled_step
from lightning_precision.optim import _compensated_step as eager
from lightning_precision.optim._inductor_codegen import step_inductor
from lightning_precision.optim._stochastic_rounding import ElementLayout, RoundingStream
from tests.optim._kernel_arguments import kernel_arguments

pytestmark = pytest.mark.skipif(
    _compiled_step.compiler_missing(torch.device("cpu")) is not None,
    reason=f"the compiled step cannot compile here: {_compiled_step.compiler_missing(torch.device('cpu'))}",
)

# Sizes: two tensors large enough for their own call, small ones packed together, an empty one and a 1-element one.
SIZES = ((300, 300), (2**16 + 7,), (40, 3), (5,), (0,), (1,), (17, 2))


def _params(seed: int, sizes=SIZES) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(torch.bfloat16)) for s in sizes]


def _train(implementation: str, steps: int, groups=None, lrs=None, **kwargs) -> tuple[list, CompensatedAdamW]:
    params = _params(0)
    if groups is None:
        groups = [{"params": params}]
    else:
        groups = [{**g, "params": [params[i] for i in g["params"]]} for g in groups]
    opt = CompensatedAdamW(groups, lr=1e-3, implementation=implementation, **kwargs)
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        for p in params:
            p.grad = (torch.randn(p.shape, generator=gen) * 1e-2).to(torch.bfloat16)
        if lrs is not None:
            for group in opt.param_groups:
                group["lr"] = lrs(step)
        opt.step()
    return params, opt


def _assert_bitwise(compiled: tuple, reference: tuple) -> None:
    (params, opt), (ref_params, ref_opt) = compiled, reference
    for i, (p, r) in enumerate(zip(params, ref_params)):
        assert torch.equal(p.view(torch.int16), r.view(torch.int16)), f"parameter {i} differs from the eager step"
        state, ref_state = opt.state[p], ref_opt.state[r]
        for key in ("compensation", "exp_avg", "exp_avg_sq"):
            a, b = state[key], ref_state[key]
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), f"{key} of parameter {i} differs"
    comps = torch.cat([opt.state[p]["compensation"].flatten().float() for p in params])
    assert comps.count_nonzero() > comps.numel() // 2  # the compensation is really carried, not all zero


@pytest.mark.parametrize(
    "kwargs",
    [
        {"weight_decay": 0.1},
        {"weight_decay": 0.0, "maximize": True},
        {"exp_avg_dtype": torch.float32},
        {"exp_avg_sq_dtype": torch.bfloat16, "exp_avg_sq_rounding": "stochastic", "rounding_seed": 3},
    ],
    ids=["decay", "maximize", "fp32-first-moment", "stochastic-second-moment"],
)
def test_compiled_step_is_bitwise_the_eager_step_over_100_steps(kwargs):
    _assert_bitwise(_train("compiled", 100, **kwargs), _train("chunked", 100, **kwargs))


def test_compiled_step_matches_eager_with_several_param_groups_and_a_scheduled_lr():
    groups = [{"params": [0, 2, 4]}, {"params": [1, 3], "weight_decay": 0.0}, {"params": [5, 6], "lr": 3e-3}]

    def schedule(step: int) -> float:
        return 1e-3 * (1 + step % 7) / 7

    _assert_bitwise(_train("compiled", 30, groups, schedule), _train("chunked", 30, groups, schedule))


def test_tied_parameter_is_stepped_once():
    shared = torch.nn.Parameter(torch.randn(2**16 + 3).to(torch.bfloat16))
    module = torch.nn.ModuleDict({"a": torch.nn.Module(), "b": torch.nn.Module()})
    module["a"].weight = shared
    module["b"].weight = shared  # tied: one Parameter under two names; parameters() yields it once
    results = []
    for implementation in ("compiled", "chunked"):
        p = torch.nn.Parameter(shared.detach().clone())
        opt = CompensatedAdamW([p], implementation=implementation)
        p.grad = torch.full_like(p, 1e-2)
        opt.step()
        results.append((p.detach().clone(), opt.state[p]["step"].item()))
    assert len(list(module.parameters())) == 1
    assert torch.equal(results[0][0], results[1][0]) and results[0][1] == results[1][1] == 1.0


def test_no_recompile_as_lr_steps_and_group_sizes_change():
    def compiles() -> int:
        return torch._dynamo.utils.counters["stats"]["unique_graphs"]

    groups = [{"params": [0]}, {"params": [1, 6], "lr": 1e-2}, {"params": [2, 3, 5]}]
    _train("compiled", 1, groups)  # compiles the kernel (or finds it compiled by an earlier test)
    before = compiles()
    _train("compiled", 12, groups, lrs=lambda step: 1e-3 / (step + 1))
    _train("compiled", 3, [{"params": [0, 1, 2, 3, 4, 5, 6]}])
    assert compiles() == before


def test_no_recompile_as_the_number_of_tensors_of_a_bucket_changes(monkeypatch):
    # Each call's scalars are a row of a table with a row per tensor of the bucket: the table's size must not be a
    # guard. Fresh compiles, so that kernels compiled by earlier tests do not hide one.
    def compiles() -> int:
        return torch._dynamo.utils.counters["stats"]["unique_graphs"]

    torch._dynamo.reset()
    monkeypatch.setattr(_compiled_step, "_checked", set())
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrecisionWarning)  # a fallback to the eager step would hide a compile
        # A bucket of as many tensors as a call has scalars (7: the sizes must not be taken for one), with large and
        # small tensors (the flat and the rows kernels).
        _train("compiled", 1)
        before = compiles()
        for params in ([1], [2], [0, 1, 2, 3, 6]):  # buckets of one tensor (tables of one row) and of five
            _train("compiled", 2, [{"params": params}])
    assert compiles() == before


def test_compile_that_folds_the_bf16_rounding_is_caught():
    # The upstream trap: without emulate_precision_casts inductor folds t - float(bf16(t)) to 0. The same kernel
    # compiled that way must fail the bitwise check the tests above make.
    folded = torch.compile(_compiled_step._kernel, backend=step_inductor({}), dynamic=True, fullgraph=True)
    params, ref_params = _params(0, ((2**16,),)), _params(0, ((2**16,),))
    hyper = eager.Hyper(0.1, 0.999, 0.001, 1e-8, 0.0, False, False)
    compensations = []
    for kernel, p in ((folded, params[0]), (None, ref_params[0])):
        g = torch.full_like(p, 1e-2)
        m, v, c = torch.zeros_like(p), torch.zeros(p.shape), torch.zeros_like(p)
        scalars = (torch.tensor([-1e-2]), torch.tensor([0.0316]))
        if kernel is None:
            bucket = eager.Bucket([p.data], [g], [m], [v], [c])
            options = eager.StepOptions(1e-3, 0.9, 0.999, 1e-8, 0.0, False, 2**16)
            eager.compensated_step(bucket, ([scalars[0].item()], [scalars[1].item()]), options)
        else:
            row = _compiled_step.kernel_scalars(hyper, *scalars)[0]
            kernel(p.data, g, m, v, c, row, (hyper.decays, hyper.maximize), (None, None), None)
        compensations.append(c)
    if torch.equal(compensations[0], compensations[1]):
        pytest.skip("this torch's inductor keeps the bf16 rounding without emulate_precision_casts")
    assert compensations[0].count_nonzero() < compensations[1].count_nonzero()


def test_stochastic_bits_match_the_eager_step_where_the_index_passes_2_31():
    # The compiled kernel adds its base index in int32 (wrapping): a shard starting past 2**31 must draw the bits the
    # eager step draws from the int64 global index.
    n, base = _compiled_step.PACK_BELOW, 2**31 - 1000  # a call of its own (smaller tensors are packed)
    layout = ElementLayout(base, (n,), (0,), (0,), (1,), 2**32 - 1)
    rounding = eager.StateRounding(exp_avg_sq=[RoundingStream(layout, 0x9E3779B9, 0)])
    options = eager.StepOptions(1e-3, 0.9, 0.999, 1e-8, 0.0, False, 2**16)
    gen = torch.Generator().manual_seed(2)
    g = (torch.randn(n, generator=gen) * 1e-2).to(torch.bfloat16)
    states = []
    for step in (_compiled_step.compiled_compensated_step, eager.compensated_step):
        p = torch.randn(n, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
        m, v, c = torch.zeros(n), torch.full((n,), 1e-4, dtype=torch.bfloat16), torch.zeros_like(p)
        scalars = (torch.tensor([-1e-2]), torch.tensor([0.0316]))
        extra = (None, [1.0]) if step is _compiled_step.compiled_compensated_step else (None,)
        step(eager.Bucket([p], [g], [m], [v], [c]), scalars, options, rounding, *extra)
        states.append((p, v, c))
    for compiled, reference in zip(*states):
        assert torch.equal(compiled.view(torch.int16), reference.view(torch.int16))


def test_explicit_compiled_warns_once_and_runs_the_eager_step_when_it_cannot_compile(monkeypatch):
    _logging.reset_reported()
    monkeypatch.setattr(_compiled_step, "compiler_missing", lambda device: "no C++ compiler (test)")
    with pytest.warns(PrecisionWarning, match="no C\\+\\+ compiler \\(test\\)") as record:
        fallback = _train("compiled", 3)
    assert sum("eager step runs" in str(w.message) for w in record) == 1
    expected = _train("chunked", 3)
    for p, r in zip(fallback[0], expected[0]):
        assert torch.equal(p, r)


def test_compiler_lookup_runs_once_per_device_type_not_per_step(monkeypatch):
    import shutil

    looked_up, real_which = [], shutil.which

    def which(name, *args, **kwargs):
        looked_up.append(name)
        return real_which(name, *args, **kwargs)

    _compiled_step._compiler_missing.cache_clear()
    monkeypatch.setattr(_compiled_step.shutil, "which", which)
    try:
        _train("compiled", 4)
        assert len(looked_up) == 1  # the first step looks the compiler up; later steps reuse the answer
        assert (
            _compiled_step.compiler_missing(torch.device("meta")) == "torch.compile is not used for device type 'meta'"
        )
        assert _compiled_step.compiler_missing(torch.device("cpu")) is None and len(looked_up) == 1
    finally:
        _compiled_step._compiler_missing.cache_clear()  # later tests look up the real compiler afresh


def test_auto_leaves_small_optimizers_eager():
    before = torch._dynamo.utils.counters["stats"]["calls_captured"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrecisionWarning)
        _train("auto", 2)  # about 160k elements: under AUTO_MIN_NUMEL
    assert torch._dynamo.utils.counters["stats"]["calls_captured"] == before
    assert sum(p.numel() for p in _params(0)) < _compiled_step.AUTO_MIN_NUMEL


def test_auto_compiles_large_optimizers():
    before = torch._dynamo.utils.counters["stats"]["calls_captured"]
    params = [torch.nn.Parameter(torch.zeros(_compiled_step.AUTO_MIN_NUMEL, dtype=torch.bfloat16))]
    opt = CompensatedAdamW(params)
    params[0].grad = torch.full_like(params[0], 1e-3)
    opt.step()
    # calls_captured counts traced ops; a cached kernel adds none, so check the kernel ran via the state instead
    assert opt.state[params[0]]["compensation"].count_nonzero() > 0
    assert _compiled_step.wanted("auto", torch.device("cpu"), params[0].numel(), None)
    assert torch._dynamo.utils.counters["stats"]["calls_captured"] >= before


def test_step_traced_by_a_users_compile_is_refused():
    p = torch.nn.Parameter(torch.zeros(8, dtype=torch.bfloat16))
    opt = CompensatedAdamW([p])
    p.grad = torch.ones_like(p)
    with pytest.raises(Exception, match="must not be compiled"):
        torch.compile(opt.step, fullgraph=True)()


# Small tensors of repeated sizes (stacked into packs of rows), unique sizes (a call each), 2-element, 1-element and
# empty ones, a DTensor-free channels-last one: all below PACK_BELOW.
SMALL_SIZES = ((40, 3),) * 7 + ((5,), (5,), (17, 2), (2,), (2,), (1,), (1,), (0,), (300,), (3, 100)) + ((64,),) * 5
STOCHASTIC_BOTH = {
    "exp_avg_rounding": "stochastic",
    "exp_avg_sq_dtype": torch.bfloat16,
    "exp_avg_sq_rounding": "stochastic",
    "rounding_seed": 11,
}


def _train_small(implementation: str, steps: int, sizes=SMALL_SIZES, **kwargs) -> tuple[list, CompensatedAdamW]:
    params = _params(0, sizes)
    opt = CompensatedAdamW(params, lr=1e-3, implementation=implementation, **kwargs)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = (torch.randn(p.shape, generator=gen) * 1e-2).to(torch.bfloat16)
        opt.step()
    return params, opt


@pytest.mark.parametrize("chunk_size", [None, 200], ids=["auto-chunk", "packs-of-few-rows"])
@pytest.mark.parametrize(
    "kwargs",
    [STOCHASTIC_BOTH, {"exp_avg_sq_dtype": torch.bfloat16, "exp_avg_sq_rounding": "stochastic", "weight_decay": 0.0}],
    ids=["both-moments", "second-moment"],
)
def test_packed_small_tensors_with_stochastic_rounding_are_bitwise_the_eager_step(kwargs, chunk_size):
    assert all(torch.Size(s).numel() < _compiled_step.PACK_BELOW for s in SMALL_SIZES)
    compiled = _train_small("compiled", 40, chunk_size=chunk_size, **kwargs)
    _assert_bitwise(compiled, _train_small("chunked", 40, chunk_size=chunk_size, **kwargs))
    _assert_bitwise(compiled, _train_small("reference", 40, **kwargs))


def test_packs_that_grow_and_shrink_reuse_their_gather_buffers_bitwise_as_the_eager_step():
    # chunk_size 200: packs of 135, 190 and 110 elements, so the buffers of the first pack grow, then are sliced.
    sizes = ((10,),) * 4 + ((95,),) * 4 + ((3,),) * 5
    kwargs = {"exp_avg_sq_dtype": torch.float32, "chunk_size": 200}
    with warnings.catch_warnings():
        # torch warns when a cat resizes its out= tensor: a gather buffer too small for its pack.
        warnings.filterwarnings("error", message="An output with one or more elements was resized")
        compiled = _train_small("compiled", 20, sizes, **kwargs)
    _assert_bitwise(compiled, _train_small("chunked", 20, sizes, **kwargs))


def test_packed_stochastic_rounding_does_not_recompile_as_steps_go():
    def compiles() -> int:
        return torch._dynamo.utils.counters["stats"]["unique_graphs"]

    _train_small("compiled", 2, **STOCHASTIC_BOTH)  # compiles the kernels (or finds them compiled by an earlier test)
    before = compiles()
    _train_small("compiled", 15, chunk_size=300, **STOCHASTIC_BOTH)
    assert compiles() == before


def test_tensors_of_different_step_counts_and_a_lone_one_element_tensor_match_the_eager_step():
    results = []
    for implementation in ("compiled", "chunked"):
        params = _params(0, ((1,), (7,), (3, 5), (2**15,)))
        opt = CompensatedAdamW(params, lr=1e-3, implementation=implementation)
        gen = torch.Generator().manual_seed(1)
        for step in range(6):
            for i, p in enumerate(params):
                # the 1-element and the 7-element tensors start later: their step counts differ from the others'
                p.grad = None if step < 2 * (i < 2) + (i == 1) else torch.randn(p.shape, generator=gen).to(p.dtype)
            opt.step()
        results.append((params, opt))
    assert [results[0][1].state[p]["step"].item() for p in results[0][0]] == [4.0, 3.0, 6.0, 6.0]
    for i, (p, r) in enumerate(zip(results[0][0], results[1][0])):
        assert torch.equal(p.view(torch.int16), r.view(torch.int16)), f"parameter {i} differs from the eager step"
        for key in ("compensation", "exp_avg", "exp_avg_sq"):
            assert torch.equal(results[0][1].state[p][key], results[1][1].state[r][key]), f"{key} of {i} differs"


def test_a_compile_that_fails_after_running_the_function_eagerly_leaves_the_step_to_the_eager_one(monkeypatch):
    # Under a dispatch mode dynamo skips the frame: the function runs eagerly, then fullgraph raises. The first call
    # is a trial on copies, so the eager fallback finds the tensors untouched and steps each once.
    from torch.distributed.tensor.debug import CommDebugMode

    _logging.reset_reported()
    monkeypatch.setattr(_compiled_step, "_checked", set())
    monkeypatch.setattr(_compiled_step, "_failed", {})
    results, messages = [], []
    for implementation in ("compiled", "chunked"):
        params = _params(0, ((20,), (_compiled_step.PACK_BELOW,), (1,)))
        opt = CompensatedAdamW(params, lr=1e-2, implementation=implementation)
        for p in params:
            p.grad = torch.full_like(p, 1e-2)
        with warnings.catch_warnings(record=True) as record, CommDebugMode():
            warnings.simplefilter("always")
            opt.step()
        results.append(params)
        messages.append([str(w.message) for w in record])
    assert any("torch.compile failed" in m for m in messages[0])  # the compiled step really fell back
    for i, (p, r) in enumerate(zip(*results)):
        assert torch.equal(p, r), f"parameter {i} was not stepped exactly once"


def _thread_switch_kernel(*args):
    _compiled_step._kernel(*args)  # a code object of its own: its compiles are this test's alone


def test_the_recompile_after_a_thread_count_change_still_fuses_the_update_into_one_loop(monkeypatch):
    # Dynamo recompiles when torch's thread count changes, and gives each input a size of its own in that compile;
    # without the kernel's shape checks inductor wrote the second moment in a second loop that recomputed the update
    # (the step ran 3.6x slower after a torch.set_num_threads call).
    backend = step_inductor({"emulate_precision_casts": True, "cpp.dynamic_threads": True})
    compiled = torch.compile(_thread_switch_kernel, backend=backend, dynamic=True, fullgraph=True)
    threads = torch.get_num_threads()
    code: list[str] = []
    try:
        torch.set_num_threads(1 if threads > 1 else 2)
        compiled(*kernel_arguments(False, False, 77))  # the first compile, on the kernel check's few elements
        compiled(*kernel_arguments(False, False, 4096))  # the step's tensors: another size, the same kernel
        torch.set_num_threads(threads)
        # Not run_and_get_code: it resets dynamo, so its call would be a first compile, not the recompile.
        monkeypatch.setattr(GraphLowering, "save_output_code", staticmethod(code.append))
        compiled(*kernel_arguments(False, False, 4096))
    finally:
        torch.set_num_threads(threads)
    source = "\n".join(code)
    assert "extern" in source, "the thread count change did not recompile"
    assert source.count("for(int64_t x0") == 1
