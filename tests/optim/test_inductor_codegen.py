"""The scoped changes to inductor's CPU code generation that the compiled CompensatedAdamW step compiles under."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch._inductor.codegen import cpp
from torch._inductor.utils import run_and_get_code

from lightning_precision.errors import PrecisionWarning
from lightning_precision.optim import CompensatedAdamW, _compiled_step
from lightning_precision.optim import _inductor_codegen as codegen
from lightning_precision.optim._inductor_codegen import (
    half_precision_tiling,
    native_bf16_rounding,
    native_bf16_rounding_available,
    step_inductor,
    vector_bit_casts,
)

pytestmark = pytest.mark.skipif(
    _compiled_step.compiler_missing(torch.device("cpu")) is not None,
    reason=f"the compiled step cannot compile here: {_compiled_step.compiler_missing(torch.device('cpu'))}",
)


@pytest.fixture(autouse=True, scope="module")
def _fresh_dynamo():
    # Dynamo allows 8 compiled variants per code object and process; the other optimizer tests of the same pytest
    # process compile their own.
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compiled_step_once() -> None:
    params = [torch.nn.Parameter(torch.randn(2**15).to(torch.bfloat16))]
    opt = CompensatedAdamW(params, implementation="compiled")
    params[0].grad = torch.full_like(params[0], 1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrecisionWarning)  # a fallback to the eager step would not compile
        opt.step()


def test_half_precision_tiling_is_undone_after_the_step():
    original = cpp.get_loop_body_lowp_fp
    _compiled_step_once()
    assert cpp.get_loop_body_lowp_fp is original
    with pytest.raises(RuntimeError, match="raised inside"), half_precision_tiling(torch.bfloat16):
        assert cpp.get_loop_body_lowp_fp is not original
        raise RuntimeError("raised inside")
    assert cpp.get_loop_body_lowp_fp is original


def test_vector_bit_casts_are_undone_after_the_step():
    original = vars(cpp.CppVecOverrides)["to_dtype_bitcast"]
    _compiled_step_once()
    assert vars(cpp.CppVecOverrides)["to_dtype_bitcast"] is original
    with pytest.raises(RuntimeError, match="raised inside"), vector_bit_casts():
        assert vars(cpp.CppVecOverrides)["to_dtype_bitcast"] is not original
        raise RuntimeError("raised inside")
    assert vars(cpp.CppVecOverrides)["to_dtype_bitcast"] is original


def _round_trip(x: torch.Tensor, scale: torch.Tensor, bits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Both directions of the stochastic rounding's casts around integer arithmetic a compiler cannot fold, on fp32
    # values computed from bf16 ones: the loop steps by a bf16 vector, two fp32 vectors a step.
    as_int = (x.float() * scale).view(torch.int32)
    truncated = (as_int + bits).bitwise_and(-65536).view(torch.float32)
    return as_int * 3, truncated.to(torch.bfloat16)


def _special_floats(n: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, generator=gen) * torch.logspace(-40, 38, n)
    x[:8] = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-45, -1e-45, 3.4e38])
    return x


@pytest.mark.parametrize("simdlen", [None, 256], ids=["widest", "avx2-width"])
def test_vector_bit_casts_give_the_eager_bits_with_a_partial_vector(simdlen):
    n = 77  # whole vectors and a tail
    x, bits = _special_floats(n).to(torch.bfloat16), torch.randint(0, 2**16, (n,), dtype=torch.int32)
    scale = torch.logspace(-30, 30, n)
    backend = step_inductor({"emulate_precision_casts": True, "cpp.simdlen": simdlen})
    compiled = torch.compile(_round_trip, backend=backend, dynamic=True)
    (ints, rounded), code = run_and_get_code(compiled, x, scale, bits)
    ref_ints, ref_rounded = _round_trip(x, scale, bits)
    assert torch.equal(ints, ref_ints)
    assert torch.equal(rounded.view(torch.int16), ref_rounded.view(torch.int16))
    assert "r[1] = at::vec::cast<int32_t>" in "\n".join(code)  # register casts of each fp32 vector, no element loop


def test_native_bf16_rounding_is_undone_after_the_step():
    original = vars(cpp.CppVecKernel)["get_to_dtype_expr"]
    _compiled_step_once()
    assert vars(cpp.CppVecKernel)["get_to_dtype_expr"] is original
    with pytest.raises(RuntimeError, match="raised inside"), native_bf16_rounding():
        raise RuntimeError("raised inside")
    assert vars(cpp.CppVecKernel)["get_to_dtype_expr"] is original


def _rounded(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x * scale).to(torch.bfloat16)


def _rounding_cases() -> torch.Tensor:
    # Each kind of special value in a 32-element vector of its own, in both of its 16-lane halves, among ordinary
    # values: a NaN in the subnormals' vector would send the whole vector to at::vec's code and hide a wrong lane.
    # Ties to even either way; subnormals (the largest rounds up to the smallest normal); quiet and signalling NaN;
    # infinities and overflow to infinity. Then a partial vector.
    kinds = [
        [0x3F808000, 0x3F818000, 0x3F80C000, 0x3F807FFF],
        [0x007FFFFF, 0x00000001, 0x807F8000 - 2**32, 0x80000001 - 2**32],
        [0x7FC00000, 0x7F800001, 0xFFC00000 - 2**32, 0x7FC00000],
        [0x7F800000, 0xFF800000 - 2**32, 0x7F7FFFFF, 0x7F7FFFFF],
    ]
    gen = torch.Generator().manual_seed(0)
    vectors = []
    for bits in kinds:
        vector = torch.randn(32, generator=gen)
        vector[[0, 7, 16, 31]] = torch.tensor(bits, dtype=torch.int32).view(torch.float32)
        vectors.append(vector)
    return torch.cat([*vectors, torch.randn(40, generator=gen)])


@pytest.mark.skipif(not native_bf16_rounding_available(), reason="no AVX512_BF16 CPU, or inductor's compiler lacks it")
def test_native_bf16_rounding_gives_the_eager_bits():
    x, scale = _rounding_cases(), torch.ones(1)
    compiled = torch.compile(_rounded, backend=step_inductor({"emulate_precision_casts": True}), dynamic=True)
    rounded, code = run_and_get_code(compiled, x, scale)
    assert "vcvtne2ps2bf16" in "\n".join(code)
    expected = _rounded(x, scale)
    nan = expected.isnan()
    assert torch.equal(rounded.isnan(), nan)
    assert torch.equal(rounded[~nan].view(torch.int16), expected[~nan].view(torch.int16))


def test_native_bf16_rounding_is_used_only_where_available(monkeypatch):
    # A CPU without AVX512_BF16 (or a compiler without the instruction) keeps inductor's conversion.
    monkeypatch.setattr(codegen, "native_bf16_rounding_available", lambda: False)
    compiled = torch.compile(_rounded, backend=step_inductor({"emulate_precision_casts": True}), dynamic=True)
    _, code = run_and_get_code(compiled, _rounding_cases(), torch.ones(1))
    assert "vcvtne2ps2bf16" not in "\n".join(code)
    assert "at::vec::convert<at::BFloat16" in "\n".join(code)


class _Isa512:
    def __init__(self, build):
        self.build = build

    def bit_width(self):
        return 512

    def check_build(self, code):
        return self.build(code)


def _raise_timeout(code):
    raise TimeoutError("the lock on inductor's build directory timed out")


@pytest.mark.parametrize("build", [lambda code: False, _raise_timeout], ids=["not-built", "lock-timeout"])
def test_native_bf16_rounding_is_off_where_its_probe_does_not_build(monkeypatch, build):
    from torch._inductor import cpu_vec_isa

    monkeypatch.setattr(cpu_vec_isa, "valid_vec_isa_list", lambda: [_Isa512(build)])
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    codegen.native_bf16_rounding_available.cache_clear()
    try:
        assert codegen.native_bf16_rounding_available() is False
    finally:
        codegen.native_bf16_rounding_available.cache_clear()
