#!/bin/bash
# Tier 2's teacher: builtin:mnist-sd at several guidance scales, DPM-Solver++(2M) at 25 NFE (what SD
# users run) and Heun at 35 NFE, with Euler / DPM-Solver++ baselines at 1-8 NFE. Picks the guided
# setting's W (the scale with the best FID) and reports label accuracy against the prompt.
#
#   bash bench/tier2_teacher.sh runs/t2-teacher 1 2 3 4.5
#
# EVAL_ARGS defaults to the quick protocol (2,000 samples x 1 seed range).
set -euo pipefail
ROOT=${1:?usage: tier2_teacher.sh OUT_ROOT W...}
shift
FEWSTEP=${FEWSTEP:-.venv/bin/fewstep}
EVAL=${EVAL_ARGS:---n 2000 --seeds 1}
for w in "$@"; do
  $FEWSTEP eval builtin:mnist-sd --out "$ROOT/w$w" --guidance "$w" --teacher-solver dpmpp_2m --teacher-nfe 25 \
    --baselines euler,dpmpp_2m --baseline-nfe 1,2,4,8 $EVAL
done
