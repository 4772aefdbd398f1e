"""Property-based tests: input casting over random nested batches, dtype parsing, and the pairing rule."""

import dataclasses
import itertools
from collections import OrderedDict, namedtuple

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning_precision.casting import cast_batch, is_preserved
from lightning_precision.catalogue import OptimizerInfo, OptimizerKind
from lightning_precision.dtypes import _DTYPE_ALIASES, parse_dtype
from lightning_precision.errors import PrecisionConfigError
from lightning_precision.pairing import Status, check_optimizer, judge

PATTERNS = ("audio",)
TENSOR_DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int8,
    torch.bool,
    torch.complex64,
    torch.uint8,
]
Point = namedtuple("Point", ["audio_x", "feat"])


@dataclasses.dataclass
class Item:
    audio: object
    other: object


keys = st.one_of(st.sampled_from(["audio", "x_audio", "Audio", "feats", "ids", "mel"]), st.integers(0, 3), st.none())


@st.composite
def tensors(draw):
    dtype = draw(st.sampled_from(TENSOR_DTYPES))
    shape = draw(st.lists(st.integers(0, 3), max_size=2))
    return (torch.randn(shape) * 10).to(dtype) if dtype != torch.bool else torch.randn(shape) > 0


leaves = st.one_of(tensors(), st.integers(), st.text(max_size=3), st.none())


def containers(children):
    return st.one_of(
        st.lists(children, max_size=3),
        st.lists(children, max_size=3).map(tuple),
        st.dictionaries(keys, children, max_size=3),
        st.dictionaries(keys, children, max_size=3).map(OrderedDict),
        st.tuples(children, children).map(lambda t: Point(*t)),
        st.tuples(children, children).map(lambda t: Item(*t)),
    )


batches = st.recursive(leaves, containers, max_leaves=12)


def check(src, out, dtype, preserved):
    """Walk ``src`` and ``out`` together and check every cast rule."""
    if isinstance(src, torch.Tensor):
        if preserved or not src.is_floating_point():
            assert out is src
        else:
            assert out.dtype == dtype and out.shape == src.shape
            assert torch.equal(out, src.to(dtype))  # same values up to the dtype's rounding
        return
    assert type(out) is type(src)
    if isinstance(src, dict):
        assert list(out) == list(src)
        for k in src:
            check(src[k], out[k], dtype, preserved or is_preserved(k, PATTERNS))
    elif dataclasses.is_dataclass(src):
        for f in dataclasses.fields(src):
            check(getattr(src, f.name), getattr(out, f.name), dtype, preserved or is_preserved(f.name, PATTERNS))
    elif isinstance(src, tuple) and hasattr(src, "_fields"):
        for f, a, b in zip(src._fields, src, out):
            check(a, b, dtype, preserved or is_preserved(f, PATTERNS))
    elif isinstance(src, (list, tuple)):
        assert len(out) == len(src)
        for a, b in zip(src, out):
            check(a, b, dtype, preserved)
    else:
        assert out is src or out == src


@settings(max_examples=150, deadline=None)
@given(batch=batches, dtype=st.sampled_from([torch.bfloat16, torch.float16]))
def test_cast_batch_properties(batch, dtype):
    check(batch, cast_batch(batch, dtype, PATTERNS), dtype, preserved=False)


@given(st.sampled_from(sorted(_DTYPE_ALIASES)), st.booleans(), st.sampled_from([str.lower, str.upper]))
def test_parse_dtype_accepts_every_spelling(name, prefixed, case):
    spelled = case(("torch." if prefixed else "") + name)
    assert parse_dtype(spelled) is _DTYPE_ALIASES[name]


@given(st.text(max_size=12))
def test_parse_dtype_rejects_or_returns_a_float_dtype(text):
    try:
        result = parse_dtype(text)
    except PrecisionConfigError as err:
        assert repr(text) in str(err)
    else:
        assert result is None or result.is_floating_point


infos = st.builds(
    OptimizerInfo,
    name=st.sampled_from(["torch.optim.adamw.AdamW", "flashoptim.optimizers.FlashAdamW", "x.Y"]),
    kind=st.sampled_from(list(OptimizerKind)),
    reason=st.just("r"),
    is_adam=st.booleans(),
    beta2=st.one_of(st.none(), st.floats(0.5, 0.9999)),
    exp_avg_sq_dtype=st.sampled_from([None, torch.float32, torch.bfloat16]),
)
storages = st.sampled_from([None, torch.float32, torch.bfloat16, torch.float16, torch.float64])


@given(storage=storages, info=infos, peft=st.booleans(), auto=st.booleans())
def test_judge_is_a_pure_function_of_its_inputs(storage, info, peft, auto):
    first = judge(storage, info, peft=peft, storage_was_auto=auto)
    again = judge(storage, OptimizerInfo(**dataclasses.asdict(info)), peft=peft, storage_was_auto=auto)
    assert first == again  # what every rank computes from the same config and dtypes


@given(storage=storages, info=infos, peft=st.booleans())
def test_only_half_storage_with_in_place_update_is_unsafe(storage, info, peft):
    unsafe = judge(storage, info, peft=peft).status is Status.UNSAFE
    expected = storage in (torch.bfloat16, torch.float16) and info.kind is OptimizerKind.STATE_FOLLOWS_PARAM
    assert unsafe == expected


class _KeepsMaster(torch.optim.AdamW):
    keeps_master_weights = True


layers = st.lists(
    st.tuples(
        st.integers(1, 9),  # out features (the first dim, the one FSDP2 shards)
        st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
        st.booleans(),  # frozen
    ),
    min_size=1,
    max_size=4,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=layers, optimizer_cls=st.sampled_from([torch.optim.AdamW, torch.optim.SGD, _KeepsMaster]))
def test_check_optimizer_decides_the_same_on_sharded_and_plain_parameters(single_rank_group, spec, optimizer_cls):
    # One rank holds the whole shard here (local == global shape); the 2-process test in
    # tests/strategies/test_distributed_reliability.py checks the counts where each rank holds half.
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    def build() -> torch.nn.Sequential:
        torch.manual_seed(0)
        dims = [3] + [out for out, _, _ in spec]
        model = torch.nn.Sequential(*(torch.nn.Linear(i, o) for i, o in itertools.pairwise(dims)))
        for layer, (_, dtype, frozen) in zip(model, spec):
            layer.to(dtype).requires_grad_(not frozen)
        return model

    plain, sharded = build(), build()
    for layer in sharded:
        fully_shard(layer)
    assert all(isinstance(p, DTensor) for p in sharded.parameters())
    verdicts = [check_optimizer(optimizer_cls(m.parameters(), lr=1e-3)) for m in (plain, sharded)]
    fields = [(v.status, v.storage_dtype, v.num_params, v.num_elements, v.message) for v in verdicts]
    assert fields[0] == fields[1]
