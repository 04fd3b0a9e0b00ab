"""A worker's cache of the weight slices it received (`dllama worker --cache-dir DIR`).

Shipping slices is most of a cluster's startup on a home network: a 4.3 GB model takes about
35 s over 1 Gbit/s to reach its workers, on every start. With a cache directory, a worker
keeps what it received on its own disk, and the next root that runs the same model on the
same plan ships nothing to it: the worker reads its slices back from the disk.

The root names the model with a fingerprint (`model_fingerprint`): a hash of the header, the
file size and 16 samples of 4 KiB spread over every tensor. Re-converting a model to the same
bytes gives the same fingerprint. A file with other weights, another quantization or another
architecture gives another fingerprint. The worker adds to it what it holds: every tensor's
cut and shape under its own plan. Different node counts, node indices or plan versions
therefore never share an entry.

An entry is a folder with one file per tensor and an `entry.json` that lists every file and
its size. The folder is written under a temporary name and renamed when complete, so a worker
that dies while storing leaves no entry. An entry whose files do not match their listed
sizes is deleted and shipped again. Nothing here checks the bytes themselves against
corruption: the cache trusts its disk, as a model file does. Before storing, the least recently
used entries are deleted until the disk keeps 5% (at least 1 GiB) free; if that is not enough,
the entry is not stored.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from dllama_py.formats.model_file import ModelFile
from dllama_py.model.plan import Plan
from dllama_py.model.structure import Split, tensor_specs

FORMAT = 1  # bump when the layout of an entry changes
RESERVE_FRACTION = 0.05  # the cache never fills the disk beyond 95%...
RESERVE_MIN = 1 << 30  # ...nor below 1 GiB free
SAMPLES_PER_TENSOR = 16
SAMPLE_BYTES = 4096


def model_fingerprint(model: ModelFile) -> str:
    """A hex id of a model file's contents: header, size and 16 samples of 4 KiB spread over
    every tensor (about 64 KiB read per tensor)."""
    h = hashlib.blake2b(digest_size=20)
    h.update(json.dumps([[int(k), v] for k, v in model.config.header_items()]).encode())
    if model.config.tensor_types:
        h.update(json.dumps([[name, int(t)] for name, t in model.config.tensor_types]).encode())
    h.update(str(model.file_size).encode())
    for tensor in model:
        h.update(tensor.name.encode())
        flat = tensor.stored.reshape(-1)
        last = max(0, flat.size - SAMPLE_BYTES)
        for i in range(SAMPLES_PER_TENSOR):
            start = last * i // (SAMPLES_PER_TENSOR - 1)
            h.update(flat[start:start + SAMPLE_BYTES].tobytes())
    model.release()
    return h.hexdigest()


def entry_key(model_id: str, plan: Plan, node: int) -> str:
    """The name of node `node`'s entry for a model under `plan`."""
    h = hashlib.blake2b(digest_size=20)
    h.update(f"{FORMAT}:{model_id}:{plan.n_nodes}:{node}".encode())
    for spec in tensor_specs(plan.config):
        cut = plan.cut(spec.name, node)
        h.update(f"{spec.name}:{cut.kind.value}:{cut.start}:{cut.stop}:{spec.float_type.name}:"
                 f"{plan.slice_shape(spec.name, spec.shape, node)};".encode())
    return h.hexdigest()


def _expected(plan: Plan, node: int) -> list[tuple[str, tuple[int, int], np.dtype, int]]:
    """(name, storage shape, dtype, bytes) of every tensor node `node` receives, in file order."""
    out = []
    for spec in tensor_specs(plan.config):
        if plan.cut(spec.name, node).kind is Split.ROOT:
            continue
        rows, cols = plan.slice_shape(spec.name, spec.shape, node)
        shape = (rows, spec.float_type.row_elements(cols))
        dtype = np.dtype(spec.float_type.storage_dtype)
        out.append((spec.name, shape, dtype, rows * shape[1] * dtype.itemsize))
    return out


class SliceCache:
    """Entries of weight slices in `root_dir`, one folder per (model, plan, node)."""

    def __init__(self, root_dir: str | os.PathLike[str], log=print) -> None:
        self.dir = Path(root_dir).expanduser()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log = log
        for tmp in self.dir.glob(".*.tmp"):  # left by a worker that died while storing
            try:
                pid = int(tmp.name.split(".")[2])
                os.kill(pid, 0)  # still alive (another worker sharing this folder): leave it
            except (ValueError, IndexError, ProcessLookupError):
                shutil.rmtree(tmp, ignore_errors=True)
            except PermissionError:
                pass

    def _folder(self, key: str) -> Path:
        return self.dir / key

    def has(self, key: str, plan: Plan, node: int) -> bool:
        """Whether a complete entry is there (every file at its listed size); deletes a broken one."""
        folder = self._folder(key)
        if not folder.is_dir():
            return False
        try:
            listed = json.loads((folder / "entry.json").read_text())["files"]
            for name, _, _, nbytes in _expected(plan, node):
                if listed.get(name) != nbytes or (folder / f"{name}.bin").stat().st_size != nbytes:
                    raise ValueError(f"{name} does not match")
        except (OSError, ValueError, KeyError, TypeError) as error:
            self.log(f"cache: entry {key[:12]} is incomplete or damaged ({error}); deleting it")
            shutil.rmtree(folder, ignore_errors=True)
            return False
        return True

    def load(self, key: str, plan: Plan, node: int) -> dict[str, np.ndarray]:
        """The slices of a complete entry (check `has` first), read into memory."""
        folder = self._folder(key)
        out = {}
        for name, shape, dtype, nbytes in _expected(plan, node):
            array = np.fromfile(folder / f"{name}.bin", dtype=dtype)
            if array.nbytes != nbytes:
                raise OSError(f"cache entry {key[:12]}: {name} changed while being read")
            out[name] = array.reshape(shape)
        os.utime(folder)  # most recently used
        return out

    def entries(self) -> list[Path]:
        """Complete entries, least recently used first."""
        found = [e for e in self.dir.iterdir() if e.is_dir() and not e.name.startswith(".")]
        return sorted(found, key=lambda e: e.stat().st_mtime)

    def make_room(self, nbytes: int) -> bool:
        """Delete least recently used entries until storing `nbytes` would leave the disk at least
        RESERVE_FRACTION (and RESERVE_MIN bytes) free; False when even an empty cache is not enough."""
        usage = shutil.disk_usage(self.dir)
        reserve = max(RESERVE_MIN, int(usage.total * RESERVE_FRACTION))
        free = usage.free
        entries = [(e, sum(f.stat().st_size for f in e.iterdir() if f.is_file())) for e in self.entries()]
        if free + sum(size for _, size in entries) - nbytes < reserve:  # deleting everything would not do
            self.log(f"cache: not storing {nbytes / 2**20:.1f} MiB: the disk has {free / 2**20:.1f} MiB free "
                     f"and keeps {reserve / 2**20:.1f} MiB for other uses")
            return False
        while free - nbytes < reserve:
            oldest, size = entries.pop(0)
            shutil.rmtree(oldest, ignore_errors=True)
            free += size
            self.log(f"cache: deleted entry {oldest.name[:12]} ({size / 2**20:.1f} MiB, least recently used) "
                     "to make room")
        return True

    def writer(self, key: str, nbytes: int) -> EntryWriter:
        """A writer for a new entry of `nbytes`; it stores nothing when the disk has no room."""
        writer = EntryWriter(self, key)
        if not writer.failed and not self.make_room(nbytes):
            writer.abort()
        return writer


class EntryWriter:
    """Writes one entry tensor by tensor; `commit` makes it visible, `abort` (or any failure)
    leaves nothing behind. A full disk only stops the caching, never the session."""

    def __init__(self, cache: SliceCache, key: str) -> None:
        self.cache, self.key = cache, key
        self.tmp = cache.dir / f".{key}.{os.getpid()}.{time.monotonic_ns()}.tmp"
        self.files: dict[str, int] = {}
        self.failed = False
        try:
            self.tmp.mkdir()
        except OSError as error:
            self._fail(error)

    def _fail(self, error: OSError) -> None:
        if not self.failed:
            self.cache.log(f"cache: cannot store slices in {self.cache.dir} ({error}); going on without")
        self.failed = True
        shutil.rmtree(self.tmp, ignore_errors=True)

    def write(self, name: str, array: np.ndarray) -> None:
        if self.failed:
            return
        try:
            array.tofile(self.tmp / f"{name}.bin")
            self.files[name] = array.nbytes
        except OSError as error:
            self._fail(error)

    def commit(self) -> None:
        if self.failed:
            return
        try:
            (self.tmp / "entry.json").write_text(json.dumps({"format": FORMAT, "files": self.files}))
            final = self.cache._folder(self.key)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(self.tmp, final)
            total = sum(self.files.values())
            self.cache.log(f"cache: stored {total / 2**20:.1f} MiB of slices as entry {self.key[:12]}")
        except OSError as error:
            self._fail(error)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.failed = True
