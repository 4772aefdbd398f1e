"""Input casting for half-precision plugins that keeps audio (and other chosen keys) in full precision.

Raw waveforms lose signal quality when rounded to bf16/fp16, so every floating-point tensor of a batch is cast
to the plugin's dtype except the ones stored under a *preserved key*: a string mapping key, dataclass field or
namedtuple field that contains one of the patterns (default ``"audio"``, case-sensitive), or an integer position in a
top-level tuple or list batch (NeMo's ASR batches are ``(audio_signal, audio_lengths, tokens, token_lengths)``, so
``preserve_keys=[0]`` keeps the audio). A preserved key protects everything below it, and preserved tensors are
returned as the very same objects.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any

import torch

from lightning_precision.dtypes import parse_dtype
from lightning_precision.values import expect_type

DEFAULT_PRESERVE_KEYS: tuple[str, ...] = ("audio",)

PreserveKey = str | int


def normalize_preserve_keys(preserve_keys: PreserveKey | Iterable[PreserveKey] | None) -> tuple[PreserveKey, ...]:
    """Validate the preserved keys.

    Args:
        preserve_keys: One key, an iterable of keys, or ``None`` for none. A string is a substring pattern of mapping
            keys and field names; an int is a position in a top-level tuple or list batch (negative counts from the
            end).

    Raises:
        TypeError: If a key is neither a string nor an int, or the keys are bytes or a mapping.
        ValueError: If a key is the empty string (it would match every key).
    """
    if preserve_keys is None:
        return ()
    if isinstance(preserve_keys, (bytes, bytearray, memoryview, dict)):
        # Iterating these would yield byte values or dict keys: a silent, wrong set of keys.
        raise TypeError(f"preserve_keys must be a string, an int or a list of them, got {preserve_keys!r}.")
    if preserve_keys == "":
        raise ValueError("preserve_keys='' would match every key and keep every tensor's dtype; give a key pattern.")
    if isinstance(preserve_keys, (str, int)) and not isinstance(preserve_keys, bool):
        return (preserve_keys,)
    expect_type(preserve_keys, Iterable, what="preserve_keys", expected="a string, an int or a list of them")
    keys = tuple(preserve_keys)
    bad = [k for k in keys if isinstance(k, bool) or not isinstance(k, (str, int))]
    if bad:
        raise TypeError(
            f"preserve_keys must be strings (key patterns) or ints (positions in a tuple batch), got {bad!r} in "
            f"{keys!r}."
        )
    if "" in keys:
        raise ValueError(
            f"preserve_keys contains '' in {keys!r}: it would match every key and keep every tensor's dtype."
        )
    return keys


def is_preserved(key: Any, patterns: tuple[PreserveKey, ...]) -> bool:
    """Whether a mapping key or field name is protected: only string keys can match a string pattern."""
    return isinstance(key, str) and any(isinstance(p, str) and p in key for p in patterns)


def cast_batch(
    batch: Any, dtype: torch.dtype, preserve_keys: Iterable[PreserveKey] | PreserveKey | None = DEFAULT_PRESERVE_KEYS
) -> Any:
    """Cast every floating-point tensor in ``batch`` to ``dtype``, except under preserved keys.

    Walks any ``Mapping`` (dict, OrderedDict, defaultdict, UserDict and subclasses such as HF ``BatchEncoding``),
    list, tuple, namedtuple and dataclass, and returns the same container types. Integer, bool and complex
    tensors, non-tensors and non-string keys pass through unchanged. A container with nothing to cast is returned
    as is.

    Args:
        batch: The batch, of any nesting.
        dtype: Target floating-point dtype.
        preserve_keys: Substring patterns of keys whose values keep their dtype, and positions of a top-level tuple or
            list batch whose elements keep theirs.

    Returns:
        The cast batch.

    Raises:
        TypeError: If ``dtype`` is not a ``torch.dtype``, or ``preserve_keys`` is not a key or keys.
        PrecisionConfigError: If ``dtype`` is not a floating-point dtype.
    """
    expect_type(dtype, torch.dtype, what="cast_batch(dtype=...)", expected="a floating-point torch.dtype")
    parse_dtype(dtype, what="cast_batch(dtype=...)")  # an integer dtype would truncate the batch's floats
    keys = normalize_preserve_keys(preserve_keys)
    positions = {k for k in keys if isinstance(k, int)}
    if positions and isinstance(batch, (list, tuple)):
        n = len(batch)
        kept = {p % n for p in positions if -n <= p < n}
        values = [v if i in kept else _cast(v, dtype, keys) for i, v in enumerate(batch)]
        if all(a is b for a, b in zip(values, batch)):
            return batch
        return _rebuild_sequence(batch, values)
    return _cast(batch, dtype, keys)


def holds_preserved(batch: Any, preserve_keys: Iterable[PreserveKey] | PreserveKey | None) -> bool:
    """Whether ``batch`` holds a floating-point tensor that ``preserve_keys`` keep (at a position of a top-level tuple
    or list batch, or under a matching key or field at any depth), as :func:`cast_batch` reads them.

    Raises:
        TypeError: If ``preserve_keys`` is not a key or keys.
    """
    keys = normalize_preserve_keys(preserve_keys)
    positions = [k for k in keys if isinstance(k, int)]
    if positions and isinstance(batch, (list, tuple)):
        n = len(batch)
        if any(_holds_float(batch[p]) for p in positions if -n <= p < n):
            return True
    return _holds_under_key(batch, keys)


def _children(node: Any) -> list[tuple[Any, Any]]:
    """``(key, value)`` for each element of a container ``cast_batch`` walks; the key is ``None`` in a plain list."""
    if isinstance(node, Mapping):
        return list(node.items())
    if isinstance(node, tuple) and hasattr(node, "_fields"):
        return list(zip(node._fields, node))
    if isinstance(node, (list, tuple)):
        return [(None, v) for v in node]
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        return [(f.name, getattr(node, f.name)) for f in dataclasses.fields(node)]
    return []


def _holds_float(node: Any) -> bool:
    if isinstance(node, torch.Tensor):
        return node.is_floating_point()
    return any(_holds_float(v) for _, v in _children(node))


def _holds_under_key(node: Any, patterns: tuple[PreserveKey, ...]) -> bool:
    return any(
        _holds_float(v) if is_preserved(k, patterns) else _holds_under_key(v, patterns) for k, v in _children(node)
    )


def _rebuild_sequence(node: list | tuple, values: list[Any]) -> list | tuple:
    if type(node) is list:
        return values
    return type(node)(*values) if hasattr(node, "_fields") else type(node)(values)


def _cast(node: Any, dtype: torch.dtype, patterns: tuple[PreserveKey, ...]) -> Any:
    if isinstance(node, torch.Tensor):
        return node.to(dtype) if node.is_floating_point() and node.dtype != dtype else node
    if isinstance(node, Mapping):
        changed = {
            k: new
            for k, v in node.items()
            if not is_preserved(k, patterns) and (new := _cast(v, dtype, patterns)) is not v
        }
        return _rebuild_mapping(node, changed) if changed else node
    if isinstance(node, tuple) and hasattr(node, "_fields"):  # namedtuple: fields are keys
        values = [v if is_preserved(f, patterns) else _cast(v, dtype, patterns) for f, v in zip(node._fields, node)]
        return node if all(a is b for a, b in zip(values, node)) else type(node)(*values)
    if isinstance(node, (list, tuple)):
        values = [_cast(v, dtype, patterns) for v in node]
        return node if all(a is b for a, b in zip(values, node)) else _rebuild_sequence(node, values)
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        changed = {
            f.name: new
            for f in dataclasses.fields(node)
            if not is_preserved(f.name, patterns)
            and (new := _cast(old := getattr(node, f.name), dtype, patterns)) is not old
        }
        if not changed:
            return node
        out = copy.copy(node)
        for name, value in changed.items():
            object.__setattr__(out, name, value)  # also works for frozen dataclasses
        return out
    return node


def _rebuild_mapping(node: Mapping, changed: dict[Any, Any]) -> Mapping:
    if isinstance(node, MutableMapping):
        # A shallow copy keeps the exact type and its extra state (defaultdict factory, BatchEncoding encodings).
        out = copy.copy(node)
        for k, v in changed.items():
            out[k] = v
        return out
    try:
        return type(node)({k: changed.get(k, v) for k, v in node.items()})
    except TypeError as err:
        raise TypeError(
            f"cast_batch cannot rebuild the read-only mapping type {type(node).__qualname__}; "
            "use a dict or a MutableMapping for batches that need casting."
        ) from err
