#!/bin/bash
# Benchmark tier 2 (docs/benchmarks.md, "Tier 2: a latent text-to-image teacher"): methods on the
# shipped SD-shaped MNIST pipeline builtin:mnist-sd (VAE 32x32 -> 4x8x8, CLIP text encoder, UNet with
# cross-attention; labels stand for its 30 evaluation prompts), in the guided setting: the student must
# reproduce the teacher guided at W (the teacher's best scale for FID, measured by bench/tier2_teacher.sh).
# Distil with a wall-clock budget, then `fewstep eval` against the guided teacher with DPM-Solver++(2M)
# at 25 NFE as the reference (what SD users run) and Euler/DPM-Solver++ baselines at 1-8 NFE:
#
#   W=1.25 bash bench/tier2_methods.sh runs/t2 lcm_lora dmd2 &  W=1.25 bash bench/tier2_methods.sh runs/t2 lcm sid &
#
# "peer" runs diffusers' train_lcm_distill_lora_sd_wds.py (adapted: bench/peer_lcm_lora_sd.py) for the same
# 15 minutes at w' = W - 1 and scores its LoRA through bench/peer_to_run.py with the same `fewstep eval`.
# Fields: run name, teacher, method, minutes, batch, method options ("W" is replaced by the scale,
# "W1" by W - 1). Method defaults follow each paper's Stable Diffusion setting where one exists:
# lcm_lora = LCM-LoRA (rank 64, lr 1e-4, AdamW, 500 warm-up steps, no target copy, no w input, pairs on
# the 50-step DDIM grid: the method's LoRA defaults) with the peer script's own l2 loss and weight decay
# 1e-2, lcm_lora_readme = the same with the method's own defaults (the README command of diffusers'
# consistency_distillation: pseudo-Huber loss, no weight decay), lcm = full-UNet LCM with LCM's w input (lr raised from SD's 1e-6 for a 15-minute budget), dmd2 with the guided
# real score, sid = SiD-LSG (long and short guidance: the scale W on the teacher, on the fake score in its
# own loss and in the generator's), guided = Meng et al.'s two stages (w in [1, 5], sampled at W) shortened
# to fit 15 minutes (300 stage-one steps, rounds 16 -> 8 -> 4 -> 2 -> 1 of 250 steps), ufogen on real data
# (it has no teacher guidance: its samples follow the data, scored against the guided teacher all the same),
# add = ADD with its SDXL-Turbo defaults, the guided teacher in its distillation loss and its discriminator
# on VAE-decoded pixels through the shipped MNIST classifier (DINOv2's stand-in);
# progressive and lightning distil the plain teacher (the unguided setting, W=1; rounds 16 -> 8 -> 4 -> 2 -> 1
# of 300 steps to fit 15 minutes), progressive_w / lightning_w the teacher guided at W in round 0 (guided setting).
# EVAL_ARGS (default: the quick protocol, 2,000 samples x 1 seed range) is passed to `fewstep eval`.
set -euo pipefail
ROOT=${1:?usage: tier2_methods.sh OUT_ROOT NAME...}
shift
W=${W:?set W, the guidance scale of the guided setting (bench/tier2_teacher.sh)}
W1=$(python3 -c "print($W - 1)")
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${OMP_NUM_THREADS:-1}
FEWSTEP=${FEWSTEP:-.venv/bin/fewstep}
T=builtin:mnist-sd
RUNS="
lcm_lora   lora:64:$T  lcm   15 16 guidance=W,W distance=l2 weight_decay=0.01
lcm_lora_readme lora:64:$T lcm 15 16 guidance=W,W
lcm        $T          lcm   15 32 guidance=W,W sample_guidance=W lr=1e-4
cd         $T          cd    15 32 guidance=W,W guidance_input=false
dmd2       $T          dmd2  15 32 guidance=W lr=1e-5 fake_lr=1e-5
sid        $T          sid   15 32 guidance=W fake_guidance=W fake_eval_guidance=W
kd         $T          kd    15 64 guidance=W
guided     $T          guided 15 32 stage_one_steps=300 start_steps=16 steps_per_round=250 guidance=W
ufogen     $T          ufogen 15 32
add        $T          add   15 32 guidance=W
progressive $T         progressive 15 32 start_steps=16 steps_per_round=300
lightning  $T          lightning 15 32 start_steps=16 steps_per_round=300
progressive_w $T       progressive 15 32 start_steps=16 steps_per_round=300 guidance=W
lightning_w $T         lightning 15 32 start_steps=16 steps_per_round=300 guidance=W
"
EVAL=${EVAL_ARGS:---n 2000 --seeds 1 --fidelity-n 100}
PY=${PY:-.venv/bin/python}
evaluate() {
  $FEWSTEP eval "$1" --guidance "$W" --teacher-solver dpmpp_2m --teacher-nfe 25 \
    --baselines euler,dpmpp_2m --baseline-nfe 1,2,4,8 $EVAL
}
for want in "$@"; do
  if [ "$want" = peer ]; then  # diffusers' own LCM-LoRA script (bench/peer_lcm_lora_sd.py), its defaults, batch 16
    $PY bench/peer_lcm_lora_sd.py --pretrained_teacher_model src/fewstep/assets/mnist-sd --output_dir "$ROOT/peer" \
      --resolution 32 --mixed_precision no --dataloader_num_workers 0 --max_train_steps 1000000 \
      --max_train_minutes 15 --seed 0 --train_batch_size 16 --w_min "$W1" --w_max "$W1"
    $PY bench/peer_to_run.py --peer "$ROOT/peer" --out "$ROOT/peer_run" --overwrite
    evaluate "$ROOT/peer_run"
    continue
  fi
  line=$(echo "$RUNS" | awk -v n="$want" '$1 == n')
  [ -n "$line" ] || { echo "unknown run $want" >&2; exit 2; }
  read -r name teacher method minutes batch opts <<<"$line"
  sets=(); for kv in $opts; do kv=${kv//W1/$W1}; sets+=(--set "${kv//W/$W}"); done
  $FEWSTEP distill --teacher "$teacher" --method "$method" --data mnist --out "$ROOT/$name" --overwrite \
    --minutes "$minutes" --batch "$batch" --checkpoint-every 100000 "${sets[@]}"
  evaluate "$ROOT/$name"
done
