#!/usr/bin/env bash
# Cross-compiles the engine and its test driver for 64-bit Windows with mingw-w64
# and runs the driver under wine, with and without the AVX2 loops.
#   tests/native/windows.sh [BUILD_DIR]      (needs g++-mingw-w64-x86-64 and wine)
set -euo pipefail
cd "$(dirname "$0")/../.."
build=${1:-build-windows}
mkdir -p "$build"
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_TOOLCHAIN_FILE=cmake/mingw-w64-x86_64.cmake \
  -DGEMMA_STREAM_PYTHON_MODULE=OFF -DGEMMA_STREAM_DRIVER=ON >"$build/configure.log" \
  || { cat "$build/configure.log"; exit 1; }
cmake --build "$build"
export WINEDEBUG=-all WINEPREFIX=${WINEPREFIX:-$(cd "$build" && pwd)/wineprefix}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
wine "$build/gemma_stream_driver.exe" "Z:$work"
GEMMA_STREAM_NO_AVX2=1 wine "$build/gemma_stream_driver.exe" "Z:$work"
