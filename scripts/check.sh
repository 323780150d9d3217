#!/usr/bin/env bash
# The tests as CI runs them: lint, format, types, then the whole pytest suite (slow tests
# included: they run the embedded models end to end). Pass pytest arguments through, e.g.
#   bash scripts/check.sh -m "not slow"
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
.venv/bin/python -m pytest "$@"
