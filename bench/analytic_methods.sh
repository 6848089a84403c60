#!/bin/bash
# Every method on the analytic image mixture (analytic:image: 4 Gaussian "prototype" 8x8 images, one
# class each, exact denoiser and density), scored at 1 NFE with the exact metrics (mean log-likelihood
# under the true mixture, modes covered, mode-mass total variation) — docs/benchmarks.md, "Every method
# on the analytic image mixture". The teacher has no network to copy: students are fewstep's default
# UNet for 8x8 images (32 channels, 0.66 M parameters). a_compress trains it into the teacher's denoiser
# (BK-SDM output KD; no features to match) once; the methods that start at the teacher start from it
# (init=a_compress, its minutes counted in each row), kd trains the network from its own start.
#
#   bash bench/analytic_methods.sh runs/ba a_compress            # first
#   bash bench/analytic_methods.sh runs/ba a_cd a_sid ... &  bash bench/analytic_methods.sh runs/ba a_kd ... &
#
# Round-based methods get 3 minutes with iteration caps that finish every round.
# Fields: run name, method, minutes, iteration cap, batch, method options ("init=NAME": start from run NAME).
set -euo pipefail
ROOT=${1:?usage: analytic_methods.sh OUT_ROOT NAME...}
shift
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
FEWSTEP=${FEWSTEP:-.venv/bin/fewstep}
EVAL_ARGS=${EVAL_ARGS:---n 2000 --seeds 1 --baselines euler,heun --baseline-nfe 1,2,4,8,35 --fidelity-n 500}
RUNS="
a_compress      compress       4 100000 64
a_kd            kd             2 100000 64
a_cd            cd             2 100000 64 init=a_compress
a_lcm           lcm            2 100000 64 init=a_compress
a_ctm           ctm            2 100000 64 init=a_compress
a_dmd           dmd            2 100000 32 init=a_compress lr=1e-4 fake_lr=1e-4
a_dmd2          dmd2           2 100000 32 init=a_compress lr=1e-4 fake_lr=1e-4 warmup=100 gen_gan_weight=0.03
a_sid           sid            2 100000 32 init=a_compress lr=1e-4 fake_lr=1e-4
a_diff_instruct diff_instruct  2 100000 32 init=a_compress lr=1e-4 fake_lr=1e-4
a_add           add            2 100000 64 init=a_compress lr=1e-4 d_lr=1e-3
a_ladd          ladd           2 100000 64 init=a_compress lr=3e-5 d_lr=1e-3 disc_m=-1
a_ufogen        ufogen         2 100000 64 init=a_compress lr=1e-4 d_lr=1e-3 chain_sigmas=7.3,0.35,0.1,0.03
a_progressive   progressive    3 1200   64 init=a_compress start_steps=16 steps_per_round=300 lr=3e-4 lr_anneal=true
a_tract         tract          3 1200   64 init=a_compress phases=40,1 steps_per_phase=600 lr=3e-4
a_guided        guided         3 1500   64 init=a_compress start_steps=16 steps_per_round=300 stage_one_steps=300 lr=3e-4 lr_anneal=true
a_lightning     lightning      3 1200   64 init=a_compress start_steps=16 steps_per_round=300 mse_rounds=1 mse_weight=1 lr=3e-4 lr_anneal=true d_lr=1e-3
"
for want in "$@"; do
  line=$(echo "$RUNS" | awk -v n="$want" '$1 == n')
  [ -n "$line" ] || { echo "unknown run $want" >&2; exit 2; }
  read -r name method minutes steps batch opts <<<"$line"
  sets=(); for kv in $opts; do
    case $kv in init=*) sets+=(--init "$ROOT/${kv#init=}");; *) sets+=(--set "$kv");; esac
  done
  $FEWSTEP distill --teacher analytic:image --method "$method" --out "$ROOT/$name" --overwrite \
    --minutes "$minutes" --max-steps "$steps" --batch "$batch" --checkpoint-every 100000 "${sets[@]}"
  steps_arg=$( [ "$method" = compress ] && echo "--steps 35" || echo "--steps 1" )
  $FEWSTEP eval "$ROOT/$name" $steps_arg $EVAL_ARGS
done
