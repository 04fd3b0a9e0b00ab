"""Shared test fixtures.

Reference data lives in ../shared/testdata (real tokenizers, real weights, outputs of llama2.c,
transformers and distributed-llama). Tests that need it fail, never skip, when it is missing.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
TESTDATA = Path(os.environ.get("DLLAMA_TESTDATA", REPO_ROOT.parent / "shared" / "testdata"))


@pytest.fixture(scope="session")
def testdata() -> Path:
    """The shared reference data folder; the test fails when it is missing."""
    if not TESTDATA.is_dir():
        pytest.fail(f"reference data not found at {TESTDATA} (set DLLAMA_TESTDATA)")
    return TESTDATA
