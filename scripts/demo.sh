#!/usr/bin/env bash
# The main job, self-installing: one recipe of each builtin technique on the builtin
# smollm2-135m, scored on the builtin offline text, with the spectrum report left in
# runs/demo/ (report.html, report.md, results.csv, Pareto plots). Short windows, 8x512
# calibration tokens and few timing runs keep it to well under an hour on 2 cores;
# KL divergence to the float model comes from the same scoring pass. Re-running reuses
# stored rows. `effspec spectrum` without --recipes runs every builtin recipe.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
exec effspec spectrum --model smollm2-135m --data stdlib-docs --out "${1:-runs/demo}" \
  --windows 4 --seqlen 512 --prompt-tokens 128 --new-tokens 32 --prefill-tokens 512 --runs 3 --kld \
  --calib-samples 8 --calib-seqlen 512 \
  --recipes baseline rtn-w8 rtn-w4-g32-asym rtn-w4-g64 rtn-w4-g64-head8 rtn-w3-g64 gptq-w4-g64 gptq-w3-g64 \
            awq-w4-g64 rotate-gptq-w3-g64 nf4-g64 fp8 w8a8 smoothquant-w8a8 magnitude-50 magnitude-2of4
