"""Lazy, bounded-memory reading of Hugging Face `*.safetensors` checkpoints (one or many shards).

Why not `safetensors.safe_open`: its numpy backend cannot return bf16 tensors, and it reads
through a memory map of the whole shard, so every page touched stays in the process's resident
set. Here each shard's JSON header is parsed once (the format is 8-byte little-endian length +
JSON + raw data) and rows are read with `readinto` into one small buffer per chunk, so memory
stays at about one chunk whatever the model size.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import numpy.typing as npt
from dllama_py.converter.hf_config import ConversionError

DTYPES: dict[str, np.dtype] = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}
INDEX_FILE = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 << 20


@dataclass(frozen=True)
class SourceTensor:
    """Where one tensor lives: shard path, dtype name (F32/F16/BF16), shape and absolute byte offset."""

    name: str
    path: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int

    @property
    def rows_cols(self) -> tuple[int, int]:
        """The tensor as a matrix: (rows, cols); a vector (n,) is (1, n)."""
        if len(self.shape) == 1:
            return 1, self.shape[0]
        return self.shape[0], int(np.prod(self.shape[1:]))


def _read_shard_header(path: Path) -> dict[str, SourceTensor]:
    size = path.stat().st_size
    with open(path, "rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            raise ConversionError(f"{path}: not a safetensors file (only {size} bytes)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(MAX_HEADER_BYTES, size - 8):
            raise ConversionError(f"{path}: not a safetensors file (header length {header_len})")
        try:
            header = json.loads(file.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ConversionError(f"{path}: safetensors header is not valid JSON ({error})") from None
    data_start, tensors = 8 + header_len, {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        if dtype not in DTYPES:
            raise ConversionError(
                f"{path}: tensor {name} has dtype {dtype}; only F32, F16 and BF16 are supported"
            )
        if end - begin != int(np.prod(shape)) * DTYPES[dtype].itemsize or data_start + end > size:
            raise ConversionError(
                f"{path}: tensor {name} has inconsistent offsets {begin}..{end} "
                f"(shape {list(shape)}, file {size} bytes): the file is damaged or truncated"
            )
        tensors[name] = SourceTensor(name, path, dtype, shape, data_start + begin)
    return tensors


def find_shards(folder: Path) -> list[Path]:
    """The safetensors files of a model folder: those named by `model.safetensors.index.json` when it
    exists, else every `*.safetensors` file, sorted by name. Raises ConversionError when there are none."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as error:
            raise ConversionError(f"{index}: not a valid safetensors index ({error})") from None
        shards = [folder / name for name in sorted(set(weight_map.values()))]
        for shard in shards:
            if not shard.is_file():
                raise ConversionError(f"{index} names {shard.name}, which is missing from {folder}")
        return shards
    shards = sorted(p for p in folder.glob("*.safetensors") if not p.name.startswith("."))
    if not shards:
        raise ConversionError(f"{folder}: no *.safetensors files found")
    return shards


class SafetensorsCheckpoint:
    """All tensors of a checkpoint folder, read lazily row-chunk by row-chunk as float32."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        """Index every tensor of every shard in `folder`; raises ConversionError on damaged input."""
        self.folder = Path(folder)
        self.tensors: dict[str, SourceTensor] = {}
        for shard in find_shards(self.folder):
            for name, tensor in _read_shard_header(shard).items():
                if name in self.tensors:
                    raise ConversionError(
                        f"tensor {name} appears in both {self.tensors[name].path.name} and {shard.name}"
                    )
                self.tensors[name] = tensor
        self._files: dict[Path, BinaryIO] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def read_rows(self, name: str, start: int, stop: int) -> npt.NDArray[np.float32]:
        """Rows [start, stop) of tensor `name` as a new float32 array (stop - start, cols)."""
        tensor = self.tensors[name]
        _, cols = tensor.rows_cols
        dtype = DTYPES[tensor.dtype]
        raw = np.empty((stop - start, cols), dtype=dtype)
        file = self._files.get(tensor.path)
        if file is None:
            file = self._files[tensor.path] = open(tensor.path, "rb")  # noqa: SIM115 (closed in close())
        file.seek(tensor.offset + start * cols * dtype.itemsize)
        if file.readinto(memoryview(raw).cast("B")) != raw.nbytes:
            raise ConversionError(f"{tensor.path}: tensor {name} is truncated")
        if tensor.dtype == "F32":
            return raw
        if tensor.dtype == "F16":
            return raw.astype(np.float32)
        widened = np.left_shift(raw, 16, dtype=np.uint32)  # bf16 is the high half of an f32
        return widened.view(np.float32)

    def close(self) -> None:
        """Close the open shard files."""
        for file in self._files.values():
            file.close()
        self._files = {}
