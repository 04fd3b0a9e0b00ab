"""distributed-llama `.m` model files: the tensor list, a memory-mapped reader and a streaming writer.

Layout (../shared/dllama-format.md section 1): int32 magic, int32 header size, (key, value) int32
pairs, then the tensors back to back with no names, padding or trailer. The order and the float
type of every tensor follow from the header alone; `tensor_specs` computes them and both the
reader and the writer use it (it lives in model/structure.py, with how a plan cuts each tensor).
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import numpy as np
import numpy.typing as npt

from dllama_py.model.config import ConfigError, FloatType, ModelConfig
from dllama_py.model.structure import TensorSpec, tensor_specs

MAGIC = 0x0A00ABCD
OLD_MAGICS = (0xABCD00, 0xABCD01)


class ModelFormatError(ValueError):
    """A `.m` file is malformed or unsupported; the message names the file and the problem."""


def encode_header(config: ModelConfig) -> bytes:
    """The header bytes (magic, size, key/value pairs) for `config`."""
    items = config.header_items()
    body = b"".join(struct.pack("<ii", int(key), value) for key, value in items)
    return struct.pack("<ii", MAGIC, 8 + len(body)) + body


@dataclass(frozen=True)
class Tensor:
    """A tensor of an open `.m` file: spec, byte offset in the file, and a read-only numpy view.

    `data` is float32 (rows, cols) for f32, uint16 fp16 bits (rows, cols) for f16, uint8
    (rows, cols/32*18) for q40 and uint8 (rows, cols/32*34) for q80. No copy is made.
    """

    spec: TensorSpec
    offset: int
    data: np.ndarray

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def shape(self) -> tuple[int, int]:
        return self.spec.shape

    @property
    def float_type(self) -> FloatType:
        return self.spec.float_type

    @property
    def stored(self) -> np.ndarray:
        """The tensor's bytes in the file (uint8)."""
        return self.data.reshape(-1).view(np.uint8)


def _parse_header(path: Path, head: bytes, file_size: int) -> tuple[int, list[tuple[int, int]]]:
    """Check magic and header size; return (header_size, [(key, value), ...])."""
    if file_size < 8:
        raise ModelFormatError(f"{path}: {file_size} bytes is too small for a model header (need at least 8)")
    magic, header_size = struct.unpack_from("<iI", head, 0)
    if magic in OLD_MAGICS:
        raise ModelFormatError(
            f"{path}: old model format (magic 0x{magic:X}); convert the model again with convert-hf"
        )
    if magic != MAGIC:
        raise ModelFormatError(
            f"{path}: bad magic 0x{magic & 0xFFFFFFFF:08X}, expected 0x{MAGIC:08X}: "
            f"not a distributed-llama model file"
        )
    if header_size < 8 or (header_size - 8) % 8:
        raise ModelFormatError(f"{path}: header size {header_size} is not 8 + 8*K")
    if header_size > file_size:
        raise ModelFormatError(
            f"{path}: header size {header_size} is larger than the file ({file_size} bytes)"
        )
    words = struct.unpack_from(f"<{(header_size - 8) // 4}i", head, 8)
    return header_size, list(zip(words[0::2], words[1::2], strict=True))


class ModelFile:
    """A `.m` file opened read-only and memory-mapped; tensors are views into the mapping.

    Use as a context manager or call `close()`; views must not be used after closing.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        """Open and validate `path`; raises ModelFormatError naming the file and the problem,
        OSError when it cannot be read."""
        self.path = Path(path)
        with open(self.path, "rb") as file:
            file_size = os.fstat(file.fileno()).st_size
            head = file.read(8)
            if len(head) == 8:  # read the whole header (its size is the second word)
                head += file.read(max(0, min(struct.unpack_from("<I", head, 4)[0], file_size) - 8))
            self.file_size = file_size
            self.header_size, self.header = _parse_header(self.path, head, file_size)
            self._map: mmap.mmap | None = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            self._load_tensors()
        except BaseException:
            self.close()
            raise

    def _load_tensors(self) -> None:
        try:
            self.config = ModelConfig.from_header(self.header)
            specs = tensor_specs(self.config)
        except ConfigError as error:
            raise ModelFormatError(f"{self.path}: {error}") from None
        expected = self.header_size + sum(spec.nbytes for spec in specs)
        if self.file_size < expected:
            start = self.header_size
            for spec in specs:
                if start + spec.nbytes > self.file_size:
                    raise ModelFormatError(
                        f"{self.path}: truncated: tensor {spec.name} needs bytes "
                        f"{start}..{start + spec.nbytes} but the file ends at {self.file_size}; "
                        f"expected {expected} bytes, found {self.file_size}"
                    )
                start += spec.nbytes
        if self.file_size > expected:
            raise ModelFormatError(
                f"{self.path}: size does not match the header: expected {expected} bytes, "
                f"found {self.file_size} ({self.file_size - expected} extra bytes)"
            )
        raw = np.frombuffer(self._map, dtype=np.uint8)
        self.tensors: dict[str, Tensor] = {}
        offset = self.header_size
        for spec in specs:
            view = (
                raw[offset : offset + spec.nbytes]
                .view(spec.float_type.storage_dtype)
                .reshape(spec.storage_shape)
            )
            self.tensors[spec.name] = Tensor(spec, offset, view)
            offset += spec.nbytes

    def __getitem__(self, name: str) -> np.ndarray:
        """The stored array of tensor `name` (see Tensor.data for dtype and shape)."""
        try:
            return self.tensors[name].data
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {name!r}") from None

    def __iter__(self) -> Iterator[Tensor]:
        return iter(self.tensors.values())

    def embed(self, ids: Sequence[int] | np.ndarray, out: np.ndarray) -> None:
        """out[i] = the embedding of ids[i] (f32 rows of the mapped file)."""
        from dllama_py.model import kernels

        kernels.embedding(self.tensors["embedding"].data, np.asarray(ids, dtype=np.int32), out)

    def release(self, name: str | None = None) -> None:
        """Let go of the resident pages of tensor `name` (of every tensor when None): this
        process's mapping drops them (they stay in the page cache, and a later read brings
        them back), so that reading a tensor once (to ship or copy a slice) does not leave the
        whole model counted in this process's memory."""
        if self._map is None or not hasattr(self._map, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
            return
        if name is None:
            start, end = 0, self.file_size
        else:
            tensor = self.tensors[name]
            start, end = tensor.offset, tensor.offset + tensor.data.nbytes
        start -= start % mmap.PAGESIZE  # madvise wants a page-aligned start
        if end > start:
            self._map.madvise(mmap.MADV_DONTNEED, start, end - start)

    def close(self) -> None:
        """Drop the tensor views and unmap the file."""
        self.tensors = {}
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # views still exported: the mapping goes when they do
                pass
            self._map = None

    def __enter__(self) -> ModelFile:  # noqa: PYI034 (typing.Self needs 3.11)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def read_model(path: str | os.PathLike[str]) -> ModelFile:
    """Open a `.m` file (memory-mapped, validated). Returns a ModelFile; raises ModelFormatError."""
    return ModelFile(path)


class ModelWriter:
    """Writes a `.m` file tensor by tensor, in `tensor_specs` order, to `path + '.tmp'`, then renames.

    Each tensor arrives as already-encoded arrays (see `write_encoded`) or as float32 values encoded
    here (`write`); rows may come in several chunks so that memory stays bounded.
    """

    def __init__(self, path: str | os.PathLike[str], config: ModelConfig) -> None:
        """Create the temporary file and write the header for `config`."""
        self.path = Path(path)
        self.config = config
        self.specs = tensor_specs(config)
        self._tmp = self.path.with_name(self.path.name + ".tmp")
        self._file = open(self._tmp, "wb")  # noqa: SIM115 (closed by close()/abort())
        self._file.write(encode_header(config))
        self._index = 0  # next tensor to write
        self._rows_done = 0  # rows of that tensor written so far
        self.bytes_written = 0

    @property
    def next_spec(self) -> TensorSpec | None:
        """The tensor expected next, or None when all are written."""
        return self.specs[self._index] if self._index < len(self.specs) else None

    def write_encoded(self, name: str, rows: npt.NDArray) -> None:
        """Append encoded rows of tensor `name`: an array of shape (n, storage cols) in the storage dtype
        (float32, uint16 fp16 bits, or uint8 blocks). Chunks of one tensor must arrive in order."""
        spec = self.next_spec
        if spec is None or spec.name != name:
            raise ValueError(f"expected tensor {spec.name if spec else '(none, file complete)'}, got {name}")
        rows = np.ascontiguousarray(rows, dtype=spec.float_type.storage_dtype)
        if rows.ndim != 2 or rows.shape[1] != spec.storage_shape[1]:
            raise ValueError(
                f"{name}: rows of shape {rows.shape} do not fit storage shape {spec.storage_shape}"
            )
        if self._rows_done + rows.shape[0] > spec.shape[0]:
            raise ValueError(f"{name}: more than {spec.shape[0]} rows written")
        self._file.write(memoryview(rows).cast("B"))
        self.bytes_written += rows.nbytes
        self._rows_done += rows.shape[0]
        if self._rows_done == spec.shape[0]:
            self._index += 1
            self._rows_done = 0

    def write(self, name: str, values: npt.NDArray[np.float32]) -> None:
        """Encode float32 rows (n, cols) of tensor `name` to its float type and append them."""
        spec = self.next_spec
        ft = spec.float_type if spec is not None and spec.name == name else FloatType.F32
        self.write_encoded(name, encode_rows(np.asarray(values, dtype=np.float32), ft))

    def close(self) -> None:
        """Finish: check every tensor was written, flush and rename the temporary file into place."""
        if self.next_spec is not None:
            self.abort()
            raise ValueError(f"{self.path}: tensor {self.specs[self._index].name} was not written")
        self._file.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        """Close and delete the temporary file."""
        self._file.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> ModelWriter:  # noqa: PYI034 (typing.Self needs 3.11)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def encode_rows(values: npt.NDArray[np.float32], float_type: FloatType) -> np.ndarray:
    """Encode float32 rows (n, cols) to `float_type` storage: float32 (n, cols), uint16 (n, cols),
    or uint8 (n, cols/32*18 | cols/32*34). Quantization and fp16 run in the C++ core."""
    if float_type == FloatType.F32:
        return values
    from dllama_py import _core  # imported here so f32 files work without the extension

    values = np.ascontiguousarray(values, dtype=np.float32)
    if float_type == FloatType.F16:
        return _core.f32_to_f16(values)
    if float_type == FloatType.Q40:
        return _core.quantize_q40(values)
    return _core.quantize_q80(values)


def write_model(
    path: str | os.PathLike[str], config: ModelConfig, tensors: Iterable[tuple[str, npt.NDArray[np.float32]]]
) -> None:
    """Write a whole `.m` file from (name, float32 (rows, cols) array) pairs in `tensor_specs` order."""
    with ModelWriter(path, config) as writer:
        for name, values in tensors:
            writer.write(name, values)
