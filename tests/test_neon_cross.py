"""The aarch64 NEON kernels, checked without ARM hardware: tests/native/run_neon.sh cross-compiles
the kernel sources with a standalone C++ test (no pybind11, no Python) and runs it under
qemu-user, comparing the "neon" table with the scalar one, checking that an ARMv8.0 CPU falls back
to scalar, and building the same test natively.

Needs the Debian packages g++-aarch64-linux-gnu and qemu-user; the test fails, never skips, when
they are missing.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "native" / "run_neon.sh"
INSTALL = "apt-get install -y g++-aarch64-linux-gnu qemu-user"


def test_neon_kernels_match_scalar_under_qemu() -> None:
    missing = [tool for tool in ("aarch64-linux-gnu-g++", "qemu-aarch64") if shutil.which(tool) is None]
    if missing:
        pytest.fail(
            f"{', '.join(missing)} not found on PATH: the NEON kernel test needs an aarch64 cross compiler "
            f"and qemu-user (Debian/Ubuntu: {INSTALL})"
        )
    result = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=600, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{SCRIPT.name} failed (exit {result.returncode}):\n{output[-20000:]}"
    assert "neon vs scalar" in output and "0 failures" in output, output[-20000:]
