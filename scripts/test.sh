#!/usr/bin/env bash
# The test suite, self-installing: `bash scripts/test.sh [pytest args]`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
export EFFSPEC_PROGRESS=0
exec python -m pytest -q "$@"
