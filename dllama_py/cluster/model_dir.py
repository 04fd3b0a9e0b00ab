"""A worker's own model files (`dllama worker --model-dir DIR`).

A worker that has the root's model file on its own disk need not receive its slices: it cuts
them from its copy as the root cuts its own (`load_node_weights`). The root names its model in
SETUP by `model_fingerprint` (cluster/slice_cache.py: a hash of the config, the file size and
16 samples of 4 KiB from every tensor); the worker fingerprints every `.m` and `.gguf` file
in DIR (not its subfolders) and answers READY with has_weights when one matches, so the root
ships it nothing.

A GGUF's config depends on how it is opened: `--weight-type` (none, q40 or q80) decides what
its other quantized matrices become, and the fingerprint covers the config. So a GGUF is
fingerprinted once for every distinct config those three give; the one that matches is opened
the same way the root opened it.

Fingerprints are kept in memory by (path, size, modification time): the folder is fingerprinted
when the worker starts, and at every root's setup only new or changed files are read again.
A file that cannot be opened as a model is skipped with a logged line (once per version of it).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dllama_py.cluster.slice_cache import model_fingerprint
from dllama_py.engine.engine import open_model
from dllama_py.formats.gguf_file import GGUFModel, is_gguf
from dllama_py.formats.model_file import ModelFile
from dllama_py.model.config import ModelConfig

SUFFIXES = (".m", ".gguf")
GGUF_WEIGHT_TYPES = (None, "q40", "q80")  # what a root may open a GGUF with (--weight-type)


class ModelDirError(ValueError):
    """--model-dir names no usable folder."""


@dataclass(frozen=True)
class LocalModel:
    """A model file in the folder, opened as `weight_type` (GGUF only), and its fingerprint."""

    path: Path
    weight_type: str | None
    fingerprint: str

    def describe(self) -> str:
        return self.path.name + (f" (as --weight-type {self.weight_type})" if self.weight_type else "")

    def open(self) -> ModelFile | GGUFModel:
        return open_model(self.path, self.weight_type)


def config_key(config: ModelConfig) -> tuple:
    """What of a config a fingerprint covers (and a root's SETUP carries)."""
    return (tuple((int(k), v) for k, v in config.header_items()),
            tuple((name, int(t)) for name, t in config.tensor_types))


def fingerprints(path: Path) -> list[LocalModel]:
    """Every way a root may open `path` that gives its own config, with its fingerprint; raises
    whatever opening a malformed file raises."""
    out, seen = [], set()
    for weight_type in GGUF_WEIGHT_TYPES if is_gguf(path) else (None,):
        model = open_model(path, weight_type)
        try:
            key = config_key(model.config)
            if key not in seen:
                seen.add(key)
                out.append(LocalModel(path, weight_type, model_fingerprint(model)))
        finally:
            model.close()
    return out


class ModelDir:
    """The model files in `folder` and their fingerprints."""

    def __init__(self, folder: str | os.PathLike[str], log: Callable[[str], None] = print) -> None:
        self.dir = Path(folder).expanduser()
        if not self.dir.exists():
            raise ModelDirError(f"{self.dir} does not exist")
        if not self.dir.is_dir():
            raise ModelDirError(f"{self.dir} is not a folder")
        try:
            os.listdir(self.dir)
        except OSError as error:
            raise ModelDirError(f"cannot read {self.dir}: {error.strerror or error}") from None
        self.log = log
        self._lock = threading.Lock()
        # (path, size, mtime_ns) -> what the file is (empty when it is no usable model)
        self._known: dict[tuple[str, int, int], list[LocalModel]] = {}
        self._unreachable: set[str] = set()  # names that could not even be looked at (logged once)

    def _files(self) -> list[tuple[Path, os.stat_result]]:
        try:
            names = sorted(os.listdir(self.dir))
        except OSError as error:
            self.log(f"model dir: cannot read {self.dir}: {error.strerror or error}")
            return []
        out, unreachable = [], set()
        for name in names:
            path = self.dir / name
            if not name.lower().endswith(SUFFIXES):
                continue
            try:
                st = path.stat()
            except OSError as error:  # e.g. a broken link
                if name not in self._unreachable:
                    self.log(f"model dir: skipping {name}: {error.strerror or error}")
                unreachable.add(name)
                continue
            if path.is_file():
                out.append((path, st))
        self._unreachable = unreachable
        return out

    def scan(self) -> list[LocalModel]:
        """Fingerprint the files not fingerprinted yet (new or changed since); every usable model."""
        with self._lock:
            known: dict[tuple[str, int, int], list[LocalModel]] = {}
            for path, st in self._files():
                key = (str(path), st.st_size, st.st_mtime_ns)
                if key not in self._known:
                    start = time.perf_counter()
                    try:
                        found = fingerprints(path)
                    except Exception as error:  # noqa: BLE001 - a bad file is skipped, never fatal
                        self.log(f"model dir: skipping {path.name}: {error}")
                        found = []
                    if found:
                        ids = ", ".join(f"{m.fingerprint[:12]}"
                                        + (f" (--weight-type {m.weight_type})" if m.weight_type else "")
                                        for m in found)
                        self.log(f"model dir: {path.name}: fingerprint {ids} "
                                 f"({time.perf_counter() - start:.2f} s)")
                    self._known[key] = found
                known[key] = self._known[key]
            self._known = known  # forget files that changed or went away
            return [m for found in known.values() for m in found]

    def find(self, model_id: str) -> LocalModel | None:
        """The file (and how to open it) whose fingerprint is `model_id`, or None."""
        return next((m for m in self.scan() if m.fingerprint == model_id), None)
