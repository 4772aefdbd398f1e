"""Inductor's CPU vector width for the compiled step of :class:`~lightning_precision.optim.CompensatedAdamW`.

Inductor's C++ backend steps a fused loop by one vector of fp32 (16 elements with AVX-512) unless every node of the
kernel touches the same half-precision dtype; then it steps by one vector of that dtype (32 elements). The compiled
step always holds a node without one: the write-back of an fp32 moment (a load of the new moment, a store into the
optimizer's state). So its loop steps by 16 and every bf16 load and store is half a vector, which inductor does with a
masked 512-bit move. Measured on an AMD EPYC (AVX-512, 1 thread, 2**19 elements a call), those masked stores take
half the kernel's time: 1.41 ns/element as generated, 0.74 with the loop step below.

While the step compiles (:func:`tiled_inductor`, the step's ``torch.compile`` backend), :func:`half_precision_tiling`
has inductor treat a kernel node without a half-precision dtype as one with the graph's, so the loop steps by 32:
bf16 loads and stores are whole vectors, fp32 ones two. Only the choice of the loop step changes; each node's code
and rounding are inductor's own (the compiled step's parity tests compare it bit for bit with the eager one). Where
inductor does not have the function this relies on, the compile keeps inductor's own choice (slower, same result).
The block also tags torch's compile cache keys, so that a kernel cached by a compile without the patch (an earlier
version of this library) is not reused for one with it.
Patching only while compiling matters: a step calls its kernel once per large tensor, and entering the block costs
about 0.1 ms (torch's config patch), more than the kernel of a 2**17-element tensor takes.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
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
    try:
        from torch._inductor.codegen import cpp
    except ImportError:
        cpp = None
    original = getattr(cpp, "get_loop_body_lowp_fp", None)
    if dtype not in _HALF_DTYPES or original is None:
        yield
        return

    def lowp_fp(body: Any) -> tuple[torch.dtype | None, bool]:
        found, needs_fp32 = original(body)
        # A node with no half-precision dtype computes in fp32 anyway (needs_fp32 stays what inductor said).
        return (dtype if found is None else found), needs_fp32

    with _lock, _cache_tag(f"lightning_precision:{dtype}-tiling"):
        cpp.get_loop_body_lowp_fp = lowp_fp
        try:
            yield
        finally:
            cpp.get_loop_body_lowp_fp = original


def _cache_tag(tag: str) -> contextlib.AbstractContextManager:
    config = torch.compiler.config
    if not hasattr(config, "cache_key_tag"):
        return contextlib.nullcontext()
    return config.patch(cache_key_tag=f"{config.cache_key_tag}|{tag}" if config.cache_key_tag else tag)


def tiled_inductor(config_patches: dict[str, Any]) -> Callable:
    """A ``torch.compile`` backend: inductor with ``config_patches``, compiling under :func:`half_precision_tiling`
    for the first half-precision dtype among the graph's inputs (the compiled step's parameters)."""

    def backend(graph: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable:
        from torch._inductor.compile_fx import compile_fx

        dtype = next((t.dtype for t in example_inputs if getattr(t, "dtype", None) in _HALF_DTYPES), None)
        with half_precision_tiling(dtype):
            return compile_fx(graph, example_inputs, config_patches=config_patches)

    return backend
