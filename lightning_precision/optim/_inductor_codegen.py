"""How inductor's CPU code generation differs, while the compiled step of
:class:`~lightning_precision.optim.CompensatedAdamW` compiles, from what it does for every other graph.

Three changes, all scoped to the step's compile (:func:`step_inductor`, its ``torch.compile`` backend), never to the
user's model, and all checked bit for bit against the eager step (``_kernel_check`` before a kernel's first use, the
parity tests in ``tests/optim/test_compiled_step.py``):

* **Loop step** (:func:`half_precision_tiling`). Inductor's C++ backend steps a fused loop by one vector of fp32 (16
  elements with AVX-512) unless every node of the kernel touches the same half-precision dtype; then it steps by one
  vector of that dtype (32 elements). The compiled step always holds a node without one: the write-back of an fp32
  moment. So its loop stepped by 16 and every bf16 load and store was half a vector, a masked 512-bit move. Measured
  on an AMD EPYC (AVX-512, 1 thread, 2**19 elements a call), those masked stores took half the kernel's time: 1.41
  ns/element as generated, 0.74 with a kernel node without a half-precision dtype treated as one with the graph's.
  Only the choice of the loop step changes; each node's code and rounding are inductor's own.
* **Bit casts** (:func:`vector_bit_casts`). Inductor has no vector form of ``Tensor.view(dtype)`` (its
  ``to_dtype_bitcast``): a vector kernel stores the vector, casts element by element and loads the result back. The
  stochastic rounding of the bf16 second moment bit casts twice per element (fp32 to int32 and back), which cost
  about a third of the default layout's kernel (1.50 ns/element). Between dtypes of one width, the cast here is
  ``at::vec::cast``, the same bits in a register: no arithmetic, nothing that could round.
* **Native bf16 rounding** (:func:`native_bf16_rounding`). ``at::vec`` rounds fp32 to bf16 with integer arithmetic
  (about 16 instructions for 32 elements) even on a CPU with AVX512_BF16, whose ``vcvtne2ps2bf16`` does it in one.
  Both round to nearest even, but the instruction reads and writes subnormals as zero; where a vector holds a
  subnormal or a NaN, ``at::vec``'s own code rounds it, so the bits stay those of the eager step. Measured on the
  same EPYC, 2**19 elements a call, 1 thread (``benchmarks/step_kernel_codegen.py``): the kernel 0.93 -> 0.71-0.73
  ns/element (12 B), 1.28-1.30 -> 1.04-1.05 (10 B). The lanes that take ``at::vec``'s code are found with one
  ``vfpclassps`` per 16 lanes (0.80 and 1.16 ns/element with two compares and an abs).

Where inductor lacks what a change relies on, the compile keeps inductor's own code (slower, same result). The block
also tags torch's compile cache keys with the change and a hash of this module, so that a kernel cached by a compile
without these changes, or with another version of them, is not reused. Patching only while compiling matters: a step
calls its kernel once per large tensor, and entering the block costs about 0.1 ms (torch's config patch), more than
the kernel of a 2**17-element tensor takes.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

_HALF_DTYPES = (torch.bfloat16, torch.float16)
_lock = threading.RLock()  # re-entered if a compile runs inside the block


@contextlib.contextmanager
def half_precision_tiling(dtype: torch.dtype) -> Iterator[None]:
    """Within the block, inductor's CPU kernels step their loops by a vector of ``dtype`` where they mix it with fp32.

    Args:
        dtype: The half-precision dtype of the compiled step's parameters; any other dtype changes nothing.
    """
    cpp = _inductor_cpp()
    original = getattr(cpp, "get_loop_body_lowp_fp", None)
    if dtype not in _HALF_DTYPES or original is None:
        yield
        return

    def lowp_fp(body: Any) -> tuple[torch.dtype | None, bool]:
        found, needs_fp32 = original(body)
        # A node with no half-precision dtype computes in fp32 anyway (needs_fp32 stays what inductor said).
        return (dtype if found is None else found), needs_fp32

    with _swapped(cpp, "get_loop_body_lowp_fp", lowp_fp, f"lightning_precision:{dtype}-tiling"):
        yield


@contextlib.contextmanager
def vector_bit_casts() -> Iterator[None]:
    """Within the block, inductor's CPU vector kernels bit cast between dtypes of one width in registers
    (``at::vec::cast``) instead of element by element; casts between widths keep inductor's own code."""
    try:
        from torch._inductor.codegen import cpp
        from torch._inductor.codegen.cpp_utils import DTYPE_TO_CPP
        from torch._inductor.virtualized import V
    except ImportError:
        yield
        return
    overrides = getattr(cpp, "CppVecOverrides", None)
    original = vars(overrides).get("to_dtype_bitcast") if overrides is not None else None
    if not isinstance(original, staticmethod):
        yield
        return

    def to_dtype_bitcast(x: Any, dtype: torch.dtype, src_dtype: torch.dtype) -> Any:
        if dtype.itemsize != src_dtype.itemsize or dtype not in DTYPE_TO_CPP:
            return original.__func__(x, dtype, src_dtype)
        vectors = V.kernel._get_num_vectors(dtype)
        target = DTYPE_TO_CPP[dtype]
        if vectors == 1:
            return f"at::vec::cast<{target}>({x})"
        # VectorizedN has constructors from one or two vectors only: set each vector, for any count (AVX2, NEON).
        sets = " ".join(f"r[{i}] = at::vec::cast<{target}>({x}[{i}]);" for i in range(vectors))
        return f"[&]() {{ at::vec::VectorizedN<{target},{vectors}> r; {sets} return r; }}()"

    # The vector kernel's op handler wraps each static method of the class when it is built, per kernel.
    with _swapped(
        overrides, "to_dtype_bitcast", staticmethod(to_dtype_bitcast), "lightning_precision:vector-bit-casts"
    ):
        yield


# Builds where inductor's compiler assembles the instruction (binutils 2.32 or later, LLVM 9 or later) and the
# AVX512DQ class test the rounding uses to find subnormals and NaN.
_PROBE = """
#include <immintrin.h>
extern "C" void lightning_precision_bf16_probe(const float* x, void* out) {
    __m512 lo = _mm512_loadu_ps(x), hi = _mm512_loadu_ps(x + 16);
    __m512i r;
    asm("vcvtne2ps2bf16 %2, %1, %0" : "=v"(r) : "v"(hi), "v"(lo));
    if ((_mm512_fpclass_ps_mask(lo, 0xA1) | _mm512_fpclass_ps_mask(hi, 0xA1)) != 0) r = _mm512_setzero_si512();
    _mm512_storeu_si512(out, r);
}
"""


@functools.cache
def native_bf16_rounding_available() -> bool:
    """Whether this CPU has AVX512_BF16 and inductor's C++ compiler builds ``vcvtne2ps2bf16`` (once per process)."""
    try:
        from torch._inductor import cpu_vec_isa
    except ImportError:
        return False
    supported = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    if supported is None or not supported():
        return False
    isa = next((i for i in cpu_vec_isa.valid_vec_isa_list() if i.bit_width() == 512), None)
    check_build = getattr(isa, "check_build", None)
    if check_build is None:
        return False
    try:
        return bool(check_build(_PROBE))
    except (OSError, RuntimeError):  # a file lock that timed out, a cache that cannot be written: inductor's code
        return False


def _native_bf16(vector: str, fallback: str) -> str:
    # One instruction for 32 lanes unless a lane is subnormal (the instruction flushes it) or NaN (at::vec writes
    # its own NaN bits); such a vector takes at::vec's code, as every vector did before.
    # fpclass 0xA1: quiet NaN (0x01), subnormal (0x20), signalling NaN (0x80); one instruction per 16 lanes.
    return (
        f"[&]() {{ __m512 lo = {vector}[0]; __m512 hi = {vector}[1]; "
        f"if (C10_UNLIKELY((_mm512_fpclass_ps_mask(lo, 0xA1) | _mm512_fpclass_ps_mask(hi, 0xA1)) != 0)) "
        f"return {fallback}; "
        '__m512i r; asm("vcvtne2ps2bf16 %2, %1, %0" : "=v"(r) : "v"(hi), "v"(lo)); '
        "return at::vec::Vectorized<at::BFloat16>(r); }()"
    )


@contextlib.contextmanager
def native_bf16_rounding() -> Iterator[None]:
    """Within the block, inductor's 512-bit CPU vector kernels round fp32 to bf16 with ``vcvtne2ps2bf16`` where
    :func:`native_bf16_rounding_available`; every other conversion keeps inductor's own code."""
    kernel = getattr(_inductor_cpp(), "CppVecKernel", None)
    original = vars(kernel).get("get_to_dtype_expr") if kernel is not None else None
    if original is None or not native_bf16_rounding_available():
        yield
        return

    def get_to_dtype_expr(self: Any, src: Any, dtype: torch.dtype, src_dtype: torch.dtype, rounding: bool = False):
        expr = original(self, src, dtype, src_dtype, rounding)
        whole_vector = getattr(src, "is_vec", False) and self.tiling_factor == 32 and self.vec_isa.bit_width() == 512
        if whole_vector and src_dtype == torch.float32 and dtype == torch.bfloat16:
            return _native_bf16(str(src), expr)
        return expr

    with _swapped(kernel, "get_to_dtype_expr", get_to_dtype_expr, "lightning_precision:native-bf16-rounding"):
        yield


def _inductor_cpp() -> Any:
    """Inductor's C++ code generation module, or None where this torch has none."""
    try:
        from torch._inductor.codegen import cpp
    except ImportError:
        return None
    return cpp


@contextlib.contextmanager
def _swapped(owner: Any, name: str, replacement: Any, tag: str) -> Iterator[None]:
    """``owner``'s attribute ``name`` is ``replacement`` within the block, under the lock (one compile patches at a
    time) and with ``tag`` on torch's compile cache keys; the original is put back however the block ends."""
    with _lock, _cache_tag(tag):
        original = vars(owner)[name]
        setattr(owner, name, replacement)
        try:
            yield
        finally:
            setattr(owner, name, original)


@functools.cache
def _source_version() -> str:
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def _cache_tag(tag: str) -> contextlib.AbstractContextManager:
    config = torch.compiler.config
    if not hasattr(config, "cache_key_tag"):
        return contextlib.nullcontext()
    tag = f"{tag}@{_source_version()}"  # a kernel cached by another version of this code generation is not reused
    return config.patch(cache_key_tag=f"{config.cache_key_tag}|{tag}" if config.cache_key_tag else tag)


def step_inductor(config_patches: dict[str, Any]) -> Callable:
    """A ``torch.compile`` backend: inductor with ``config_patches``, compiling under :func:`half_precision_tiling`
    for the first half-precision dtype among the graph's inputs (the compiled step's parameters) and under
    :func:`vector_bit_casts` and :func:`native_bf16_rounding`."""

    def backend(graph: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable:
        from torch._inductor.compile_fx import compile_fx

        dtype = next((t.dtype for t in example_inputs if getattr(t, "dtype", None) in _HALF_DTYPES), None)
        with half_precision_tiling(dtype), vector_bit_casts(), native_bf16_rounding():
            return compile_fx(graph, example_inputs, config_patches=config_patches)

    return backend
