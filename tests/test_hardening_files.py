"""Files (issue 14, defects 7 and 8): the KV cache file of --kv-cache-storage disk never stays
behind, not even after kill -9, and a directory given as --model or --tokenizer says so."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from cluster_helpers import REPO

from dllama_py.commands.cli import main
from dllama_py.engine.engine import Engine
from dllama_py.engine.exchange import ARGMAX

_KV_USER = """
import sys, time
from dllama_py.engine.engine import Engine
from dllama_py.engine.exchange import ARGMAX
engine = Engine(sys.argv[1], threads=1, kv_storage="disk")
engine.step([1, 403], 0, ARGMAX)
print("ready", engine.argmax(), flush=True)
time.sleep(600)
"""


def kv_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("dllama-kv-*"))


def test_the_kv_cache_file_is_gone_while_the_engine_runs(stories, tmp_path, monkeypatch):
    model, _ = stories
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    engine = Engine(model, threads=1, kv_storage="disk")
    try:
        assert kv_files(tmp_path) == []
        mapped = [line for line in Path("/proc/self/maps").read_text().splitlines() if "dllama-kv-" in line]
        assert mapped and all(line.endswith("(deleted)") for line in mapped), mapped  # on disk, unlinked
        engine.step([1, 403], 0, ARGMAX)
        assert engine.argmax() == 407
    finally:
        engine.close()
    assert kv_files(tmp_path) == []


def test_no_kv_cache_file_stays_behind_after_kill_9(stories, tmp_path):
    """A 50 MB file per run used to stay in /tmp after kill -9."""
    model, _ = stories
    child = subprocess.Popen([sys.executable, "-c", _KV_USER, str(model)], stdout=subprocess.PIPE, text=True,
                             cwd=REPO, env=dict(os.environ, TMPDIR=str(tmp_path)))
    try:
        assert child.stdout is not None and child.stdout.readline().split() == ["ready", "407"]
        assert kv_files(tmp_path) == []
        maps = Path(f"/proc/{child.pid}/maps").read_text()
        assert f"{tmp_path}/dllama-kv-" in maps  # the cache is a mapping of a file in that folder
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    assert kv_files(tmp_path) == []


@pytest.mark.parametrize("flag", ["--model", "--tokenizer"])
def test_a_directory_given_as_a_file_says_it_is_a_directory(stories, tmp_path, capsys, flag):
    """It used to say "model file not found"."""
    model, tok = stories
    paths = {"--model": str(model), "--tokenizer": str(tok), flag: str(tmp_path)}
    code = main(["inference", "--model", paths["--model"], "--tokenizer", paths["--tokenizer"], "--prompt", "Once",
                 "--steps", "1", "--nthreads", "1"])
    assert code == 1
    kind = ".m or .gguf" if flag == "--model" else ".t"
    assert capsys.readouterr().err == f"error: {flag} {tmp_path} is a directory; give the {kind} file itself\n"

