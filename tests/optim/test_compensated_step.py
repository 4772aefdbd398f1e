"""The chunked (bounded-memory) step of CompensatedAdamW against its whole-tensor reference step."""

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_precision.errors import PrecisionConfigError
from lightning_precision.optim import CompensatedAdamW
from lightning_precision.optim._chunk_plan import (
    TRANSIENT_BUDGET,
    auto_chunk_size,
    flat_local_views,
    plan_chunks,
    temp_bytes_per_element,
)

REPO = Path(__file__).resolve().parents[2]


@given(
    numels=st.lists(st.integers(min_value=0, max_value=300), min_size=1, max_size=8),
    chunk_size=st.integers(min_value=1, max_value=257),
)
@settings(max_examples=200, deadline=None)
def test_plan_chunks_covers_every_element_once_within_the_bound(numels, chunk_size):
    chunks = plan_chunks(numels, chunk_size)
    sizes = [sum(stop - start for _, start, stop in chunk) for chunk in chunks]
    assert all(0 < s <= chunk_size for s in sizes)
    assert all(s == chunk_size for s in sizes[:-1])  # only the last chunk may be short
    covered = {i: [] for i in range(len(numels))}
    for chunk in chunks:
        for i, start, stop in chunk:
            assert 0 <= start < stop <= numels[i]
            covered[i].append((start, stop))
    for i, numel in enumerate(numels):
        spans = covered[i]
        assert [a for a, _ in spans] == [0] + [b for _, b in spans[:-1]] if spans else numel == 0
        assert (spans[-1][1] if spans else 0) == numel


def test_auto_chunk_size_keeps_temporaries_within_the_budget():
    cpu, meta = torch.device("cpu"), torch.device("meta")
    bf16, f32 = torch.bfloat16, torch.float32
    temp = temp_bytes_per_element(bf16, bf16, f32, compensated=True)
    assert temp == 16  # fp32 gradient/parameter, compensation, copy of the bf16 first moment, denominator/decay
    assert temp_bytes_per_element(bf16, bf16, bf16, compensated=True) == 20
    assert temp_bytes_per_element(torch.float64, torch.float64, torch.float64, compensated=False) == 24
    for total in (10**6, 3 * 10**6 + 7):
        chunk = auto_chunk_size(total, cpu, temp)
        assert chunk * temp <= TRANSIENT_BUDGET * total < (chunk + 1) * temp
    assert auto_chunk_size(10, cpu, temp) == 4096  # tiny models: dispatch cost, not memory, bounds the chunk
    assert auto_chunk_size(10**9, cpu, temp) == 2**17
    assert auto_chunk_size(10**10, meta, temp) == 2**22


def _model_tensors(seed):
    """Parameters of mixed dtypes, odd sizes and layouts (one transposed, one channels-last)."""
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(3001, generator=g).to(torch.bfloat16),
        torch.randn(7, 9, generator=g).to(torch.bfloat16).t(),  # non-contiguous, dense
        torch.randn(2, 3, 4, 5, generator=g).to(torch.bfloat16).contiguous(memory_format=torch.channels_last),
        torch.randn(513, generator=g).to(torch.float16),
        torch.randn(1, generator=g).to(torch.bfloat16),
        torch.randn(2049, generator=g),  # fp32: plain AdamW
        torch.randn(33, generator=g).to(torch.float64),
    ]


def _train(implementation, steps=6, chunk_size=1000, seed=0, **kwargs):
    params = [torch.nn.Parameter(t.clone()) for t in _model_tensors(seed)]
    groups = [
        {"params": params[:3], "weight_decay": 0.1},
        {"params": params[3:5], "lr": 3e-3, "betas": (0.8, 0.99), "eps": 1e-6, "exp_avg_dtype": "fp32"},
        {"params": params[5:], "weight_decay": 0.0, "exp_avg_sq_dtype": torch.bfloat16},
    ]
    opt = CompensatedAdamW(groups, lr=1e-2, implementation=implementation, chunk_size=chunk_size, **kwargs)
    g = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        for p in params:
            # Same layout as the parameter, as autograd produces it.
            p.grad = torch.empty_like(p).copy_(torch.randn(p.shape, generator=g))
        opt.step()
    return params, opt


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"chunk_size": 7},
        {"chunk_size": 64},
        {"chunk_size": None},
        {"maximize": True, "chunk_size": 777},
        {"exp_avg_dtype": torch.float16, "exp_avg_sq_dtype": "bf16"},
        {"exp_avg_dtype": "float32", "exp_avg_sq_dtype": "float32"},
    ],
)
def test_chunked_step_is_bitwise_the_reference(kwargs):
    ref_params, ref_opt = _train("reference", **kwargs)
    params, opt = _train("chunked", **kwargs)
    for i, (p, r) in enumerate(zip(params, ref_params)):
        assert p.stride() == r.stride(), i
        assert torch.equal(p, r), f"param {i} ({p.dtype}) differs from the reference"
        state, ref_state = opt.state[p], ref_opt.state[r]
        assert set(state) == set(ref_state)
        for key in state:
            assert state[key].dtype == ref_state[key].dtype, (i, key)
            assert torch.equal(state[key], ref_state[key]), f"param {i} {key} differs from the reference"


@pytest.mark.parametrize("threads", [1, 2])
def test_chunk_boundaries_do_not_change_the_result(threads):
    # A large tensor crosses many chunk boundaries and, with 2 threads, the kernels' own parallel split points.
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        results = []
        for implementation, chunk in (("reference", None), ("chunked", 4099), ("chunked", None)):
            g = torch.Generator().manual_seed(3)
            p = torch.nn.Parameter(torch.randn(300_007, generator=g).to(torch.bfloat16))
            opt = CompensatedAdamW([p], lr=1e-3, weight_decay=0.05, implementation=implementation, chunk_size=chunk)
            for _ in range(3):
                p.grad = torch.randn(p.shape, generator=g).to(torch.bfloat16)
                opt.step()
            results.append((p.detach().clone(), opt.state[p]["compensation"].clone(), opt.state[p]["exp_avg"].clone()))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_flat_local_views_alias_storage_and_reject_mismatched_layouts():
    a = torch.zeros(4, 6).t()
    views = flat_local_views([a, torch.zeros(4, 6).t()])
    assert views is not None and views[0].data_ptr() == a.data_ptr()
    views[0][0] = 1.0
    assert a[0, 0] == 1.0
    assert flat_local_views([torch.zeros(6, 4), torch.zeros(4, 6).t()]) is None  # different strides
    assert flat_local_views([torch.zeros(4, 6)[:, ::2], torch.zeros(4, 6)[:, ::2]]) is None  # gaps


def test_flat_local_views_take_contiguous_tensors_whose_strides_differ_only_along_size_one_dimensions():
    a = torch.arange(4.0).view(4, 1)  # strides (1, 1)
    b = torch.as_strided(torch.arange(4.0) * 10, (4, 1), (1, 7))
    assert a.stride() != b.stride() and b.is_contiguous()
    views = flat_local_views([a, b])
    assert views is not None and torch.equal(views[1], views[0] * 10)  # element i of one is element i of the other
    # A non-contiguous tensor of the same shape is still refused.
    assert flat_local_views([a, torch.zeros(4, 2)[:, :1]]) is None


def test_non_aligned_layouts_fall_back_to_the_reference_step():
    # A gradient whose strides differ from the parameter's cannot be walked element by element with it.
    g = torch.Generator().manual_seed(0)
    init, grad = torch.randn(5, 8, generator=g).to(torch.bfloat16), torch.randn(8, 5, generator=g).to(torch.bfloat16)
    out = []
    for implementation in ("reference", "chunked"):
        p = torch.nn.Parameter(init.clone())
        opt = CompensatedAdamW([p], implementation=implementation)
        p.grad = grad.clone().t()
        opt.step()
        out.append((p.detach(), opt.state[p]["compensation"]))
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])


def test_state_dict_round_trip_continues_bitwise():
    params, opt = _train("chunked", steps=3)
    sd = copy.deepcopy(opt.state_dict())
    assert sd["param_groups"][0]["implementation"] == "chunked"
    clones = [torch.nn.Parameter(p.detach().clone()) for p in params]
    groups = [{"params": clones[:3]}, {"params": clones[3:5]}, {"params": clones[5:]}]
    opt2 = CompensatedAdamW(groups, implementation="reference", chunk_size=5)
    opt2.load_state_dict(sd)
    assert [g["chunk_size"] for g in opt2.param_groups] == [1000] * 3
    for p, q in zip(params, clones):
        for key, value in opt.state[p].items():
            assert opt2.state[q][key].dtype == value.dtype and torch.equal(opt2.state[q][key], value), key
    g = torch.Generator().manual_seed(9)
    for _ in range(2):
        for p, q in zip(params, clones):
            p.grad = torch.empty_like(p).copy_(torch.randn(p.shape, generator=g))
            q.grad = p.grad.clone()
        opt.step()
        opt2.step()
    assert all(torch.equal(p, q) for p, q in zip(params, clones))


def _dtype_values(obj):
    if isinstance(obj, torch.dtype):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _dtype_values(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _dtype_values(v)


def test_param_groups_hold_dtype_names_not_torch_dtypes():
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))
    q = torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))
    opt = CompensatedAdamW([{"params": [p]}, {"params": [q], "exp_avg_dtype": torch.float16}], exp_avg_sq_dtype="BF16")
    assert [g["exp_avg_dtype"] for g in opt.param_groups] == ["bfloat16", "float16"]
    assert opt.param_groups[0]["exp_avg_sq_dtype"] == "bfloat16"
    assert opt.defaults["exp_avg_dtype"] == "bfloat16"
    p.grad, q.grad = torch.ones_like(p), torch.ones_like(q)
    opt.step()
    assert opt.state[q]["exp_avg"].dtype == torch.float16
    assert list(_dtype_values(opt.state_dict())) == []


def test_loads_old_state_dict_with_torch_dtypes_and_no_implementation_keys():
    p = torch.nn.Parameter(torch.randn(5).to(torch.bfloat16))
    opt = CompensatedAdamW([p], exp_avg_dtype="fp32", exp_avg_sq_dtype="fp32")
    p.grad = torch.randn(5).to(torch.bfloat16)
    opt.step()
    old = copy.deepcopy(opt.state_dict())
    for group in old["param_groups"]:  # how the optimizer saved them before dtype names and roundings
        group["exp_avg_dtype"], group["exp_avg_sq_dtype"] = torch.float32, torch.float32
        del group["implementation"], group["chunk_size"], group["exp_avg_rounding"], group["exp_avg_sq_rounding"]
    q = torch.nn.Parameter(p.detach().clone())
    opt2 = CompensatedAdamW([q])
    opt2.load_state_dict(old)
    group = opt2.param_groups[0]
    assert (group["exp_avg_dtype"], group["implementation"], group["chunk_size"]) == ("float32", "auto", None)
    assert group["exp_avg_sq_rounding"] == "nearest"  # this optimizer's "auto", for the saved fp32 moment
    assert opt2.state[q]["exp_avg"].dtype == torch.float32
    assert torch.equal(opt2.state[q]["exp_avg"], opt.state[p]["exp_avg"])
    assert isinstance(old["param_groups"][0]["exp_avg_dtype"], torch.dtype)  # the caller's dict is untouched
    assert list(_dtype_values(opt2.state_dict())) == []


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        ({"implementation": "fast"}, "'fast'.*chunked"),
        ({"chunk_size": 0}, "chunk_size: 0"),
        ({"chunk_size": 2.5}, "chunk_size: 2.5"),
        ({"exp_avg_dtype": torch.float64}, "torch.float64.*bfloat16"),
    ],
)
def test_invalid_options_name_the_value_and_choices(kwargs, fragment):
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(PrecisionConfigError, match=fragment):
        CompensatedAdamW([p], **kwargs)
    with pytest.raises(PrecisionConfigError, match=fragment):
        CompensatedAdamW([{"params": [p], **kwargs}])


def test_distributed_checkpoint_save_and_load_restore_exactly(tmp_path):
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("gloo backend not available")
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    from tests.strategies._launch import free_port

    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{free_port()}")
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 2)).to(torch.bfloat16)
        model[1].float()
        opt = CompensatedAdamW(model.parameters(), exp_avg_dtype=torch.float16)
        for _ in range(2):
            model[1](model[0](torch.randn(4, 6, dtype=torch.bfloat16)).float()).sum().backward()
            opt.step()
        # full_state_dict + cpu_offload type-checks every value: a torch.dtype in param_groups raised ValueError here.
        full = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        assert list(_dtype_values(full)) == []
        dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=str(tmp_path))

        fresh = copy.deepcopy(model)
        # DCP loads in place into the target's state tensors, so the target is built with the same state dtypes.
        opt2 = CompensatedAdamW(fresh.parameters(), lr=0.5, exp_avg_dtype="fp16")
        target = {"optim": get_optimizer_state_dict(fresh, opt2)}
        dcp.load(target, checkpoint_id=str(tmp_path))
        set_optimizer_state_dict(fresh, opt2, target["optim"])
    finally:
        dist.destroy_process_group()
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert opt2.param_groups[0]["exp_avg_dtype"] == "float16"
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert set(opt.state[p]) == set(opt2.state[q])
        for key, value in opt.state[p].items():
            assert opt2.state[q][key].dtype == value.dtype, key
            assert torch.equal(opt2.state[q][key], value), key


# Runs in a fresh interpreter: for each implementation, the peak resident memory of the second step over the resident
# memory just before it (the first step creates the state).
_PEAK_CHILD = textwrap.dedent(
    """
    import ctypes, json, re, sys
    import torch
    from lightning_precision.optim import CompensatedAdamW

    torch.set_num_threads(1)
    n = int(sys.argv[1])

    def kib(field):
        return int(re.search(field + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1))

    peaks = {}
    for implementation in sys.argv[2:]:
        p = torch.nn.Parameter(torch.full((n,), 0.5, dtype=torch.bfloat16))
        opt = CompensatedAdamW([p], weight_decay=0.1, implementation=implementation)
        p.grad = torch.full((n,), 0.25, dtype=torch.bfloat16)
        opt.step()
        p.grad.fill_(-0.125)
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap of step 1 must not hide step 2's growth
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak resident set size (VmHWM) to the current one
        before = kib("VmRSS")
        opt.step()
        peaks[implementation] = (kib("VmHWM") - before) * 1024 / n
        del p, opt
    print(json.dumps(peaks))
    """
)


def _peak_bytes_per_param(n, *implementations):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    # glibc otherwise serves large blocks from a heap it keeps, which would hide growth from the resident size.
    env["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)
    out = subprocess.run(
        [sys.executable, "-c", _PEAK_CHILD, str(n), *implementations],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc/self/clear_refs (VmHWM reset)"
)
def test_step_transient_memory_is_bounded():
    # One 16M-element bf16 tensor: each whole-tensor fp32 copy is 64 MiB, 4 B/param.
    peaks = _peak_bytes_per_param(16 * 2**20, "chunked", "reference")
    # The measurement sees whole-tensor copies: the reference step holds several fp32 copies at once.
    assert peaks["reference"] > 8.0, peaks
    assert peaks["chunked"] < 0.5, f"chunked step grew resident memory by {peaks['chunked']:.3f} B/param ({peaks})"


@pytest.mark.parametrize("compensated", [True, False])
@pytest.mark.parametrize("chunk_size", [7, 1000])
def test_masked_step_leaves_flagged_tensors_and_matches_elsewhere(compensated, chunk_size):
    # The accelerator path: flags stay a device tensor and the writes are masked (run here on CPU).
    from lightning_precision.optim._compensated_step import Bucket, StepOptions, compensated_step, plain_step

    dtype = torch.bfloat16 if compensated else torch.float32
    gen = torch.Generator().manual_seed(0)
    shapes = [5, 12, 3]

    def tensors():
        params = [torch.randn(n, generator=gen).to(dtype) for n in shapes]
        grads = [torch.randn(n, generator=gen).to(dtype) for n in shapes]
        m = [torch.randn(n, generator=gen).to(dtype) for n in shapes]
        v = [torch.rand(n, generator=gen) if compensated else torch.rand(n, generator=gen).to(dtype) for n in shapes]
        c = [(torch.randn(n, generator=gen) * 1e-3).to(dtype) if compensated else None for n in shapes]
        return Bucket(params, grads, m, v, c)

    plain = tensors()
    masked = Bucket(*[[t.clone() if t is not None else None for t in ts] for ts in plain])
    masked.grads[1][4] = float("nan")
    before = Bucket(*[[t.clone() if t is not None else None for t in ts] for ts in masked])
    scalars = ([-1e-2] * 3, [0.5] * 3)
    options = StepOptions(1e-2, 0.9, 0.999, 1e-8, 0.1, False, chunk_size)
    step = compensated_step if compensated else plain_step
    step(plain, scalars, options)
    step(masked, scalars, options, finite=torch.tensor([True, False, True]))
    for field in ("params", "exp_avgs", "exp_avg_sqs") + (("comps",) if compensated else ()):
        got, ref, old = getattr(masked, field), getattr(plain, field), getattr(before, field)
        assert torch.equal(got[1], old[1]), field
        assert torch.equal(got[0], ref[0]) and torch.equal(got[2], ref[2]), field
