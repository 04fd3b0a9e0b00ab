#!/usr/bin/env bash
# Checks the NEON kernels without ARM hardware: cross-compiles tests/native/test_kernels_neon.cpp
# with the kernel sources for aarch64 (static), runs it under qemu-user on an ARMv8.2+dotprod CPU
# model (neon vs scalar) and on an ARMv8.0 one (Cortex-A72, as in a Raspberry Pi 4: must fall back
# to scalar), then builds and runs the same program with the native compiler (on x86-64: the
# AVX2 / AVX-512 paths vs scalar, and "neon" refused).
#
# Needs: aarch64-linux-gnu-g++ and qemu-aarch64 (Debian: apt-get install -y g++-aarch64-linux-gnu qemu-user).
# Compiles one file at a time at low priority. Env: CXX (native compiler, default g++),
# DLLAMA_NATIVE_BUILD (build folder to keep; default a temporary one, removed at exit).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
SRC="$ROOT/csrc"
TEST="$ROOT/tests/native/test_kernels_neon.cpp"
CROSS="${CROSS_CXX:-aarch64-linux-gnu-g++}"
NATIVE="${CXX:-g++}"
QEMU="${QEMU_AARCH64:-qemu-aarch64}"

for tool in "$CROSS" "$QEMU" "$NATIVE"; do
    command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install -y g++-aarch64-linux-gnu qemu-user)" >&2; exit 2; }
done

if [[ -n "${DLLAMA_NATIVE_BUILD:-}" ]]; then
    BUILD="$DLLAMA_NATIVE_BUILD"
    mkdir -p "$BUILD"
else
    BUILD="$(mktemp -d)"
    trap 'rm -rf "$BUILD"' EXIT
fi

# As CMakeLists.txt compiles the kernel library (at -O2). Warnings are errors in the NEON file,
# the CPU detection and this test; the other sources are compiled quietly.
COMMON=(-O2 -std=c++17 -pthread -fno-math-errno -fopenmp-simd -I"$SRC")
# Paths under csrc/, as CMakeLists.txt lists them (net/ is not needed here).
BASE_SOURCES=(kernels/quants.cpp kernels/cpu_features.cpp kernels/thread_pool.cpp kernels/kernels.cpp
              kernels/kernels_scalar.cpp ops/ops.cpp)

compile() {  # compiler out.o source flags...
    local cxx="$1" out="$2" src="$3" warn=(-w)
    shift 3
    case "$(basename "$src")" in
        kernels_neon.cpp|cpu_features.cpp|test_kernels_neon.cpp) warn=(-Wall -Wextra -Wno-unused-parameter -Werror) ;;
    esac
    nice -n 10 "$cxx" "${COMMON[@]}" "${warn[@]}" "$@" -c "$src" -o "$out"
}

# ---- aarch64: baseline armv8-a everywhere but kernels_neon.cpp, as CMakeLists.txt builds it ----
echo "== aarch64 cross build ($CROSS)"
mkdir -p "$BUILD/arm"
objs=()
for s in "${BASE_SOURCES[@]}"; do
    o="$BUILD/arm/$(basename "${s%.cpp}").o"
    compile "$CROSS" "$o" "$SRC/$s" -march=armv8-a -DDLLAMA_HAVE_NEON=1
    objs+=("$o")
done
compile "$CROSS" "$BUILD/arm/kernels_neon.o" "$SRC/kernels/kernels_neon.cpp" -march=armv8.2-a+dotprod+fp16 -DDLLAMA_HAVE_NEON=1
compile "$CROSS" "$BUILD/arm/test.o" "$TEST" -march=armv8-a -DDLLAMA_HAVE_NEON=1
nice -n 10 "$CROSS" -static -pthread "${objs[@]}" "$BUILD/arm/kernels_neon.o" "$BUILD/arm/test.o" -o "$BUILD/test_arm"

echo "== qemu-aarch64 -cpu max (ARMv8.2+ with dotprod and fp16): neon vs scalar"
env -u DLLAMA_ISA "$QEMU" -cpu max "$BUILD/test_arm" --require neon
echo "== qemu-aarch64 -cpu neoverse-n1 (ARMv8.2 with dotprod and fp16): neon vs scalar"
env -u DLLAMA_ISA "$QEMU" -cpu neoverse-n1 "$BUILD/test_arm" --require neon
echo "== qemu-aarch64 -cpu cortex-a72 (ARMv8.0, no dotprod): scalar fallback"
env -u DLLAMA_ISA "$QEMU" -cpu cortex-a72 "$BUILD/test_arm" --expect-only scalar

# ---- native build: the same program and kernel sources for this machine ----
echo "== native build ($NATIVE, $(uname -m))"
mkdir -p "$BUILD/native"
objs=()
defs=()
case "$(uname -m)" in
    x86_64|amd64) defs=(-DDLLAMA_HAVE_X86=1) ;;
    aarch64|arm64) defs=(-DDLLAMA_HAVE_NEON=1) ;;
esac
for s in "${BASE_SOURCES[@]}"; do
    o="$BUILD/native/$(basename "${s%.cpp}").o"
    compile "$NATIVE" "$o" "$SRC/$s" "${defs[@]}"
    objs+=("$o")
done

case "$(uname -m)" in
    x86_64|amd64)
        compile "$NATIVE" "$BUILD/native/kernels_avx2.o" "$SRC/kernels/kernels_avx2.cpp" "${defs[@]}" -mavx2 -mfma -mf16c
        compile "$NATIVE" "$BUILD/native/kernels_avx512.o" "$SRC/kernels/kernels_avx512.cpp" "${defs[@]}" \
            -mavx2 -mfma -mf16c -mavx512f -mavx512bw -mavx512vl -mavx512dq
        compile "$NATIVE" "$BUILD/native/kernels_avx512vnni.o" "$SRC/kernels/kernels_avx512vnni.cpp" "${defs[@]}" \
            -mavx2 -mfma -mf16c -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512vnni
        objs+=("$BUILD/native/kernels_avx2.o" "$BUILD/native/kernels_avx512.o" "$BUILD/native/kernels_avx512vnni.o")
        ;;
    aarch64|arm64)
        compile "$NATIVE" "$BUILD/native/kernels_neon.o" "$SRC/kernels/kernels_neon.cpp" "${defs[@]}" -march=armv8.2-a+dotprod+fp16
        objs+=("$BUILD/native/kernels_neon.o")
        ;;
esac
compile "$NATIVE" "$BUILD/native/test.o" "$TEST" "${defs[@]}"
nice -n 10 "$NATIVE" -pthread "${objs[@]}" "$BUILD/native/test.o" -o "$BUILD/test_native"
echo "== native run"
env -u DLLAMA_ISA "$BUILD/test_native"
echo "OK: neon kernels match scalar under qemu; native build passes"
