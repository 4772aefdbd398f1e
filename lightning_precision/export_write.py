"""Writing ``safetensors`` files tensor by tensor, sharded the way Hugging Face shards them, and published atomically.

``safetensors.torch.save_file`` needs every tensor of a file in memory at once; here the header is computed from the
shapes and dtypes first, then each tensor's bytes are streamed, so memory holds one tensor. The layout is the
``safetensors`` format (8-byte little-endian header length, JSON header, raw little-endian data), which
``safetensors.torch.load_file`` and ``transformers``' ``from_pretrained`` read.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from lightning_precision.errors import CheckpointExportError, PrecisionConfigError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_SHARD_NAME = "model-{:05d}-of-{:05d}.safetensors"
_STALE = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?$")  # what an earlier export left
_ST_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor of the output: its name there, shape and dtype (known before its value is computed)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


def parse_size(value: int | str) -> int:
    """Bytes from ``5000000``, ``"5GB"`` (10^9, as Hugging Face counts), ``"500MB"`` or ``"2GiB"``.

    Raises:
        PrecisionConfigError: If the value is not a positive size.
    """
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(value))
    unit = match.group(2).upper() if match else ""
    if match and unit in _UNITS and float(match.group(1)) > 0:
        return int(float(match.group(1)) * _UNITS[unit])
    raise PrecisionConfigError(
        f"max_shard_size={value!r} is not a size. Valid: a positive number of bytes, optionally with a unit "
        f"({', '.join(u for u in ('KB', 'MB', 'GB', 'TB', 'KiB', 'MiB', 'GiB'))}), e.g. '5GB'."
    )


def plan_shards(tensors: Sequence[PlannedTensor], max_bytes: int) -> list[list[PlannedTensor]]:
    """Split the tensors, in order, into files of at most ``max_bytes`` of data (a larger tensor gets its own file,
    as Hugging Face does)."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def _header(tensors: Sequence[PlannedTensor]) -> bytes:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}  # transformers refuses a file without "format"
    offset = 0
    for t in tensors:
        if t.dtype not in _ST_DTYPES:
            raise CheckpointExportError(f"tensor {t.name!r} has dtype {t.dtype}, which safetensors cannot store.")
        end = offset + t.nbytes
        header[t.name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, end]}
        offset = end
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)  # the data starts 8-byte aligned


def write_safetensors(
    path: Path, tensors: Sequence[PlannedTensor], value: Callable[[PlannedTensor], torch.Tensor]
) -> None:
    """Write one safetensors file, asking ``value`` for each tensor in turn (only one is held at a time).

    Raises:
        CheckpointExportError: If ``value`` returns a tensor of another shape or dtype than planned.
    """
    if sys.byteorder != "little":  # safetensors data is little-endian; raw bytes of a big-endian host would not be
        raise CheckpointExportError("export writes safetensors on little-endian machines only.")
    header = _header(tensors)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        for planned in tensors:
            t = value(planned)
            if tuple(t.shape) != planned.shape or t.dtype != planned.dtype:
                raise CheckpointExportError(
                    f"tensor {planned.name!r} came out as {t.dtype} {list(t.shape)}, planned {planned.dtype} "
                    f"{list(planned.shape)}."
                )
            if t.numel():
                f.write(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data)
            del t
    _check_readable(path, tensors)


def _check_readable(path: Path, tensors: Sequence[PlannedTensor]) -> None:
    """Open the file with ``safetensors`` (header only) before it is published: a file it cannot read is a bug here."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        found = set(f.keys())
    if found != {t.name for t in tensors}:
        raise CheckpointExportError(
            f"{path.name}: safetensors reads {len(found)} tensors, {len(tensors)} were written."
        )


class StagedOutput:
    """Files written under a hidden temporary directory inside ``output_dir`` and moved into place by
    :meth:`publish`, so an export that fails leaves nothing under the final names.

    Args:
        output_dir: Where the files go (created if missing).

    Raises:
        CheckpointExportError: If ``output_dir`` cannot be created or written.
    """

    def __init__(self, output_dir: str | os.PathLike) -> None:
        self.output_dir = Path(output_dir)
        self._created = not self.output_dir.exists()
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self.staging = Path(tempfile.mkdtemp(prefix=".export-", dir=self.output_dir))
        except OSError as err:
            raise CheckpointExportError(
                f"output directory {str(output_dir)!r} is not writable ({err.strerror or err})."
            ) from None

    def path(self, name: str) -> Path:
        """Where to write the file that will be published as ``name``."""
        return self.staging / name

    def publish(self, names: Sequence[str]) -> list[Path]:
        """Move the written files into ``output_dir`` (the index, if any, last), replacing an earlier export's.

        Returns:
            The published paths.
        """
        for old in self.output_dir.iterdir():
            if old.is_file() and _STALE.match(old.name) and old.name not in names:
                old.unlink()  # a single file and an index side by side would make loaders pick one at random
        ordered = [n for n in names if n != INDEX_FILE] + [n for n in names if n == INDEX_FILE]
        for name in ordered:
            os.replace(self.staging / name, self.output_dir / name)
        self.discard()
        return [self.output_dir / n for n in names]

    def discard(self) -> None:
        """Remove the staging directory (and ``output_dir`` if this export created it and it is empty)."""
        shutil.rmtree(self.staging, ignore_errors=True)
        if self._created and self.output_dir.is_dir() and not any(self.output_dir.iterdir()):
            self.output_dir.rmdir()


def write_sharded(
    staged: StagedOutput,
    tensors: Sequence[PlannedTensor],
    value: Callable[[PlannedTensor], torch.Tensor],
    max_bytes: int,
) -> list[str]:
    """Write ``model.safetensors``, or shards plus ``model.safetensors.index.json`` when the data is above
    ``max_bytes``, into the staging directory.

    Returns:
        The names of the files written, to publish.
    """
    shards = plan_shards(tensors, max_bytes)
    if len(shards) == 1:
        write_safetensors(staged.path(SINGLE_FILE), shards[0], value)
        return [SINGLE_FILE]
    names, weight_map = [], {}
    for i, shard in enumerate(shards, start=1):
        name = _SHARD_NAME.format(i, len(shards))
        write_safetensors(staged.path(name), shard, value)
        names.append(name)
        weight_map.update({t.name: name for t in shard})
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)}, "weight_map": weight_map}
    staged.path(INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return [*names, INDEX_FILE]
