"""Shared test fixtures.

Reference data lives in ../shared/testdata (real tokenizers, real weights, outputs of llama2.c,
transformers and distributed-llama). Tests that need it fail, never skip, when it is missing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from api_support import ApiServer, make_stories_files
from cluster_helpers import WorkerProcess

REPO_ROOT = Path(__file__).resolve().parent.parent
TESTDATA = Path(os.environ.get("DLLAMA_TESTDATA", REPO_ROOT.parent / "shared" / "testdata"))


@pytest.fixture(scope="session")
def testdata() -> Path:
    """The shared reference data folder; the test fails when it is missing."""
    if not TESTDATA.is_dir():
        pytest.fail(f"reference data not found at {TESTDATA} (set DLLAMA_TESTDATA)")
    return TESTDATA


@pytest.fixture(scope="session")
def stories_f32(testdata: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """stories260K converted with this project's converters: (f32 .m file, tok512 .t file)."""
    from dllama_py.converter.convert_hf import main as convert_hf
    from dllama_py.converter.convert_tokenizer import main as convert_tokenizer

    folder = tmp_path_factory.mktemp("stories")
    model, tok = folder / "stories_f32.m", folder / "tok512.t"
    assert convert_hf([str(testdata / "stories260K_hf"), "f32", "stories", "--output", str(model), "--quiet"]) == 0
    assert convert_tokenizer([str(testdata / "stories260K" / "tok512.model"), "tok512", "--output", str(tok)]) == 0
    return model, tok


@pytest.fixture(scope="module")
def stories(stories_f32: tuple[Path, Path]) -> tuple[Path, Path]:
    return stories_f32


@pytest.fixture(scope="module")
def workers():
    """Three workers, shared by the tests of this module (each test leaves them waiting)."""
    procs = [WorkerProcess() for _ in range(3)]
    yield procs
    for w in procs:
        w.stop()


@pytest.fixture(scope="module")
def reference(testdata: Path) -> list[dict]:
    return json.loads((testdata / "reference" / "stories260K_greedy.json").read_text())["results"]


# ---- dllama-api over stories260K (tests/api_support.py) -----------------------------------------

@pytest.fixture(scope="session")
def stories_files(testdata: Path, tmp_path_factory) -> tuple[Path, Path]:
    """stories260K's model and tokenizer files, for API servers."""
    return make_stories_files(testdata, tmp_path_factory.mktemp("stories"))


@pytest.fixture(scope="module")
def server(stories_files, tmp_path_factory):
    """A dllama-api process over stories260K, one per test module."""
    api = ApiServer(*stories_files, tmp_path_factory.mktemp("api_logs") / "api.log")
    yield api
    api.stop()
