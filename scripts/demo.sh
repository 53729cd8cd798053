#!/usr/bin/env bash
# The main job, self-installing: every builtin recipe on the builtin smollm2-135m,
# scored on the builtin offline text, with the spectrum report left in runs/demo/
# (report.html, report.md, results.csv, two Pareto plots). Short windows and few
# timing runs so it finishes in minutes on 2 cores; KL divergence to the float model
# comes from the same scoring pass. Re-running reuses stored rows.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
exec effspec spectrum --model smollm2-135m --data stdlib-docs --out "${1:-runs/demo}" \
  --windows 4 --seqlen 512 --prompt-tokens 128 --new-tokens 32 --prefill-tokens 512 --runs 3 --kld
