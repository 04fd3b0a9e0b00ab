"""SIMD path and thread control of the C++ core, `dllama --version`, and the bandwidth probe.

The numerical tests live beside this file: test_kernels_quant.py (Q40, Q80, F16),
test_kernels_matmul.py, test_kernels_ops.py and test_kernels_attention.py; each runs on every
path in kernel_reference.PATHS.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from kernel_reference import PATHS, THREADS, kernel_settings

import dllama_py
from dllama_py.model import kernels

ALL_PATH_NAMES = ("scalar", "neon", "avx2", "avx512", "avx512vnni")


def cpu_flags() -> set[str]:
    """The feature flags Linux reports for this CPU (empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def run(command: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    """Run a command with DLLAMA_ISA / DLLAMA_NTHREADS exactly as given (unset unless passed)."""
    environment = {k: v for k, v in os.environ.items() if k not in ("DLLAMA_ISA", "DLLAMA_NTHREADS")}
    environment.update(env)
    return subprocess.run(command, check=False, capture_output=True, text=True, env=environment, timeout=60)


def run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return run([sys.executable, "-c", code], **env)


DLLAMA_SCRIPT = str(Path(sys.executable).parent / "dllama")


def test_every_path_this_cpu_runs_is_under_test(record_property: pytest.RecordProperty) -> None:
    record_property("simd_paths_tested", ",".join(PATHS))
    print(f"SIMD paths under test: {', '.join(PATHS)} (compiled: {', '.join(kernels.compiled_isas())})")
    assert PATHS == kernels.supported_isas()
    assert PATHS[0] == "scalar"
    assert set(PATHS) <= set(kernels.compiled_isas()) <= set(ALL_PATH_NAMES)
    assert kernels.best_isa() == PATHS[-1]
    flags = cpu_flags()
    if platform.machine() in ("x86_64", "AMD64"):
        assert {"avx2", "avx512", "avx512vnni"} <= set(kernels.compiled_isas())  # one build for any x86-64
        if {"avx2", "fma", "f16c"} <= flags:
            assert "avx2" in PATHS
        if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
            assert "avx512" in PATHS
            if "avx512_vnni" in flags:
                assert "avx512vnni" in PATHS
        if "avx512f" not in flags:
            assert "avx512" not in PATHS and "avx512vnni" not in PATHS


@pytest.mark.parametrize("isa", PATHS)
def test_set_isa_switches_the_path_in_use(isa: str) -> None:
    before = kernels.get_isa()
    with kernel_settings(isa, 1):
        assert kernels.get_isa() == isa
    assert kernels.get_isa() == before


def test_set_isa_with_an_unknown_name_lists_the_available_paths() -> None:
    before = kernels.get_isa()
    with pytest.raises(ValueError, match="SIMD path 'sse9' is not available here") as raised:
        kernels.set_isa("sse9")
    assert str(raised.value).endswith(f"this build and CPU support: {', '.join(PATHS)}")
    assert kernels.get_isa() == before  # unchanged


@pytest.mark.parametrize("isa", PATHS)
def test_dllama_isa_environment_variable_forces_the_path_in_a_fresh_process(isa: str) -> None:
    result = run_python("import dllama_py.model.kernels as k; print(k.get_isa())", DLLAMA_ISA=isa)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == isa


def test_an_empty_dllama_isa_means_the_best_path() -> None:
    result = run_python("import dllama_py.model.kernels as k; print(k.get_isa())", DLLAMA_ISA="")
    assert result.stdout.strip() == kernels.best_isa()


def test_an_invalid_dllama_isa_fails_with_the_name_and_the_available_paths() -> None:
    code = "import numpy as np, dllama_py.model.kernels as k; k.quantize_q80(np.zeros(32, np.float32))"
    result = run_python(code, DLLAMA_ISA="avx1024")
    assert result.returncode != 0
    assert (
        "ValueError: DLLAMA_ISA=avx1024: SIMD path 'avx1024' is not available here; this build and CPU support: "
        in result.stderr
    )
    assert ", ".join(PATHS) in result.stderr


def test_dllama_version_prints_version_paths_path_in_use_and_threads() -> None:
    result = run([DLLAMA_SCRIPT, "--version"])
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"dllama-py {dllama_py.__version__}"
    assert f"SIMD paths compiled in: {', '.join(kernels.compiled_isas())}" in lines
    assert f"SIMD paths this CPU runs: {', '.join(PATHS)}" in lines
    assert any(line.startswith(f"SIMD path in use: {kernels.best_isa()}") for line in lines)
    assert f"default threads: {kernels.hardware_threads()}" in lines


def test_dllama_version_reports_a_forced_path() -> None:
    result = run([DLLAMA_SCRIPT, "--version"], DLLAMA_ISA="scalar")
    assert "SIMD path in use: scalar" in result.stdout


# ---- threads ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("nthreads", THREADS)
def test_set_num_threads_resizes_the_pool(nthreads: int) -> None:
    with kernel_settings(kernels.best_isa(), nthreads):
        assert kernels.get_num_threads() == nthreads


def test_the_default_pool_has_one_thread_per_hardware_thread_unless_dllama_nthreads_says() -> None:
    assert kernels.hardware_threads() == os.cpu_count()
    result = run_python("import dllama_py.model.kernels as k; print(k.get_num_threads())")
    assert result.stdout.strip() == str(kernels.hardware_threads())
    result = run_python("import dllama_py.model.kernels as k; print(k.get_num_threads())", DLLAMA_NTHREADS="3")
    assert result.stdout.strip() == "3"


@pytest.mark.parametrize("nthreads", [0, -1, 1025])
def test_set_num_threads_refuses_a_count_outside_1_to_1024(nthreads: int) -> None:
    with pytest.raises(ValueError, match="number of threads must be between 1 and 1024"):
        kernels.set_num_threads(nthreads)


# ---- stream_read: the bandwidth probe's checksum -----------------------------------------------------
def checksum_reference(data: np.ndarray) -> int:
    """Sum of the little-endian uint64 words mod 2^64, plus the bytes of a tail shorter than a word."""
    words = len(data) // 8
    total = int(np.frombuffer(data[: words * 8].tobytes(), dtype="<u8").sum(dtype=np.uint64)) if words else 0
    return (total + int(data[words * 8 :].sum())) % 2**64


@pytest.mark.parametrize("nthreads", THREADS)
def test_stream_read_checksum_is_the_sum_of_the_uint64_words(nthreads: int) -> None:
    data = np.random.default_rng(11).integers(0, 256, (1 << 20) + 21, dtype=np.uint8)
    with kernel_settings(kernels.best_isa(), nthreads):
        for n in (0, 7, 8, 200, 3 * 512 * 8 + 5, len(data) - 1):
            assert kernels.stream_read(data[:n]) == checksum_reference(data[:n]), n
        assert kernels.stream_read(data[1:]) == checksum_reference(data[1:])  # not 8-byte aligned
        full = np.full(1 << 16, 0xFF, np.uint8)  # words of 2^64 - 1: the sum wraps
        assert kernels.stream_read(full) == checksum_reference(full)


def test_stream_read_takes_only_uint8() -> None:
    with pytest.raises(TypeError, match="data must be a uint8 array"):
        kernels.stream_read(np.zeros(8, np.uint64))
