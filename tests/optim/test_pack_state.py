"""The state of packed small tensors, kept in one buffer per pack by the compiled CompensatedAdamW step."""

from __future__ import annotations

import io
import warnings

import pytest
import torch

from lightning_precision.errors import PrecisionWarning
from lightning_precision.optim import CompensatedAdamW, _compiled_step
from lightning_precision.optim._pack_state import span

pytestmark = pytest.mark.skipif(
    _compiled_step.compiler_missing(torch.device("cpu")) is not None,
    reason=f"the compiled step cannot compile here: {_compiled_step.compiler_missing(torch.device('cpu'))}",
)
BF16 = torch.bfloat16
STATE_KEYS = ("exp_avg", "exp_avg_sq", "compensation")
LAYOUTS = {"12B": {"exp_avg_sq_dtype": torch.float32}, "10B": {}}  # flat packs; [rows, size] packs


@pytest.fixture(autouse=True, scope="module")
def _fresh_dynamo():
    # Dynamo allows 8 compiled variants per code object and process; other optimizer tests compile their own.
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _params(sizes=((40, 3), (120,), (7, 17), (120,), (2, 3, 4, 5), (120,))) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(BF16)) for s in sizes]


def _steps(opt: CompensatedAdamW, params: list, steps: int, seed: int, skip=lambda step, i: False) -> None:
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        for i, p in enumerate(params):
            grad = (torch.randn(p.shape, generator=gen) * 1e-2).to(BF16)
            p.grad = None if skip(step, i) else grad.contiguous(memory_format=_format(p))
        with warnings.catch_warnings():
            warnings.simplefilter("error", PrecisionWarning)  # a fallback to the eager step would not test the packs
            opt.step()


def _format(p: torch.Tensor) -> torch.memory_format:
    return (
        torch.channels_last
        if p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last)
        else torch.contiguous_format
    )


def _pair(layout: str, **kwargs) -> list[tuple[list, CompensatedAdamW]]:
    pairs = []
    for implementation in ("compiled", "chunked"):
        params = _params(**kwargs)
        pairs.append((params, CompensatedAdamW(params, lr=1e-2, implementation=implementation, **LAYOUTS[layout])))
    return pairs


def _assert_same(pairs: list[tuple[list, CompensatedAdamW]]) -> None:
    (params, opt), (ref_params, ref_opt) = pairs
    for p, r in zip(params, ref_params):
        assert torch.equal(p.view(torch.int16), r.view(torch.int16))
        for key in STATE_KEYS:
            a, b = opt.state[p][key], ref_opt.state[r][key]
            assert a.shape == b.shape and a.stride() == b.stride()
            assert torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)), key


@pytest.mark.parametrize("layout", LAYOUTS)
def test_packed_state_lives_in_one_buffer_per_pack_with_the_eager_results(layout):
    pairs = _pair(layout)
    for params, opt in pairs:
        _steps(opt, params, 5, seed=1)
    _assert_same(pairs)
    params, opt = pairs[0]
    # One flat pack of every tensor in order (12 B); a [rows, size] pack of the tensors of one size (10 B).
    pack = params if layout == "12B" else [p for p in params if p.numel() == 120]
    for key in STATE_KEYS:
        assert span([opt.state[p][key].view(-1) for p in pack]) is not None, key


def test_a_pack_whose_members_change_moves_its_state_again_with_the_eager_results():
    pairs = _pair("12B")
    for params, opt in pairs:
        # The middle tensor has no gradient every third step: the pack loses a member, then gets it back.
        _steps(opt, params, 7, seed=2, skip=lambda step, i: i == 2 and step % 3 == 1)
    _assert_same(pairs)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_loaded_state_is_moved_into_pack_buffers_and_continues_as_without_a_resume(layout):
    pairs = _pair(layout)
    for params, opt in pairs:
        _steps(opt, params, 3, seed=3)
    params, opt = pairs[0]
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    resumed = CompensatedAdamW(params, lr=1e-2, implementation="compiled", **LAYOUTS[layout])
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    pairs[0] = (params, resumed)
    for params, opt in pairs:
        _steps(opt, params, 3, seed=4)
    _assert_same(pairs)


def test_a_channels_last_state_keeps_its_strides_when_moved():
    sizes = ((2, 3, 4, 5), (2, 3, 4, 5), (2, 3, 4, 5))
    pairs = _pair("12B", sizes=sizes)
    for params, _ in pairs:
        for p in params:
            p.data = p.data.contiguous(memory_format=torch.channels_last)
    for params, opt in pairs:
        _steps(opt, params, 4, seed=5)
    _assert_same(pairs)
    params, opt = pairs[0]
    assert all(opt.state[p]["exp_avg"].stride() == p.stride() for p in params)


def test_a_saved_state_dict_stores_each_pack_buffer_once():
    params = _params(sizes=((1000,),) * 8)
    opt = CompensatedAdamW(params, lr=1e-2, implementation="compiled")
    _steps(opt, params, 2, seed=6)
    packed, unpacked = io.BytesIO(), io.BytesIO()
    torch.save(opt.state_dict(), packed)
    state = opt.state_dict()
    torch.save(
        {**state, "state": {k: {n: t.clone() for n, t in s.items()} for k, s in state["state"].items()}}, unpacked
    )
    assert packed.tell() <= 1.02 * unpacked.tell()  # not the whole buffer once per tensor
