#!/bin/bash
# Every method on builtin:digits under the benchmark protocol (../docs/benchmarks.md, "Methods on
# digits"): distil with a wall-clock budget and the options below, evaluate with `fewstep eval`
# (10,000 samples x 3 seed ranges; the teacher's rows are cached), then rank the runs with
# `fewstep bench --runs`. Runs are independent; two lanes in parallel fit 2 CPU cores:
#
#   bash bench/digits_methods.sh runs/b12 sid cd tract &  bash bench/digits_methods.sh runs/b12 kd dmd2 &
#   wait; fewstep bench --runs runs/b12/sid,runs/b12/cd,... --out docs/bench-digits
#
# Fields: run name, method, minutes, iteration cap, batch, evaluation-EMA decay (a number: fixed from
# the first update, as the runs measured before the ramp-up existed; "ref": the method's reference
# EMA with EDM's ramp-up, the engine's default for new runs), method options.
# "init=NAME" starts the run from run NAME under the same OUT_ROOT (a warm-started chain: run NAME
# first; the leaderboard counts both runs' minutes); snapshot_minutes keeps checkpoints for curves.
# lcmdiag_*: what makes LCM (lcm_w1) worse than CD on digits — one LCM option at a time on CD, 5 minutes
# each, quick protocol (EVAL_ARGS="--n 2000 --seeds 1").
# Iteration caps schedule the multi-round methods (rounds/phases are scheduled by iteration).
# The rows without "_ref" keep the options they were measured with where later fixes (issue 15:
# CTM's target, DSM levels and weight; DMD2's dropout) changed a default; SiD, Diff-Instruct and
# DMD changed without an option (no dropout noise in the fake score's estimate; SiD and
# Diff-Instruct step the fake score before the generator uses it), so their older rows do not
# reproduce exactly with today's code — the *_ref rows are today's.
# Students that are not teacher copies (issue 19): compress_* warm a smaller network up (BK-SDM's
# output- and feature-level distillation; _nofeat: output only), *_q / *_h are quarter / half-size
# students (cd and dmd2 start from the warm-up, kd trains from scratch), cd_lora* train LoRA adapters;
# cd_q12: CD from a 12-minute output-only warm-up (is the warm-up what holds cd_q back?).
# Issue 18 (15 minutes per stage): scd (tangent warm-up shortened to 500 iterations of ~3,800; scd_fd:
# the finite-difference tangent), ect
# (8 stages of Δt over the run's ~6,000 iterations, as ECT's 8-stage schedule), tcm (stage 2 from ect,
# continuing its Δt schedule), meanflow (the ImageNet time sampler) / meanflow_c and imf (FastGen's
# CIFAR-10 sampler: r mostly near 0, so one-step jumps are trained), fdistill and sida with sid_ref's learning rates (the
# GAN after 20 kimg, the reference's 200 kimg being most of this budget), sid2a = SiD²A (sida from
# the sid_snap generator; run sid_snap first); fdistill_kl: the forward KL (f-distill's CIFAR-10 choice);
# sida_g0: the GAN from the first iteration.
# Issue 17 (15 minutes per stage; pair generation counted once and named in docs/benchmarks.md): reflow = 1-RF
# on the teacher's 10k Heun-18 pairs, reflow2 = 2-RF on the 1-RF's pairs, *_distill = the one-step
# distillation on the previous flow's pairs; perflow (4 windows, 8 teacher DDIM steps each), boot (data-free),
# perflow_lr: lr 2e-4 (reflow's) and a 100-iteration warm-up instead of SD's 8e-5 / 500 (batch 64, not 1024);
# perflow and perflow_lr ran with the teacher copy's dropout 0.1, perflow_d0 with today's default 0 (SD's UNet);
# boot_heun: Heun teacher steps in the target (DDIM's 18-point trajectory bounds boot);
# traflow (CTM + the straight-velocity loss on the teacher's 10k pairs), dsno (10k teacher trajectories; batch
# 32 x 4 levels; the reference's 10k-iteration warm-up shortened to 500 of this budget's ~3,000).
# EVAL_ARGS is passed to `fewstep eval` (e.g. EVAL_ARGS="--baselines euler" to skip the other
# training-free baselines; the leaderboard takes its baselines from its first run).
set -euo pipefail
ROOT=${1:?usage: digits_methods.sh OUT_ROOT NAME...}
shift
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
FEWSTEP=${FEWSTEP:-.venv/bin/fewstep}
RUNS="
sid            sid            12 100000 32 0.999 lr=1e-4 fake_lr=1e-4
dmd2           dmd2           12 100000 32 0.999 lr=1e-4 fake_lr=1e-4 warmup=100 gen_gan_weight=0.03 dropout=none
dmd2_f2        dmd2           12 100000 32 0.999 lr=1e-4 fake_lr=1e-4 warmup=100 gen_gan_weight=0.03 fake_updates=2 dropout=none
kd             kd             12 100000 64 0.999
diff_instruct  diff_instruct  12 100000 32 0.999 lr=1e-4 fake_lr=1e-4
dmd            dmd            12 100000 32 0.999 lr=1e-4 fake_lr=1e-4
cd             cd             12 100000 64 0.999
lcm            lcm            10 100000 64 0.999
lcm_w1         lcm            10 100000 64 0.999 guidance=1,3 sample_guidance=1 lr=4e-4
tract          tract          12 2400   64 0     phases=40,1 steps_per_phase=2400 lr=3e-4
progressive    progressive    12 3500   64 0     start_steps=32 steps_per_round=700 lr=3e-4 lr_anneal=true
progressive64  progressive    14 5400   64 0     start_steps=64 steps_per_round=900 lr=3e-4 lr_anneal=true
guided         guided         10 3000   64 0     start_steps=32 steps_per_round=500 stage_one_steps=500 lr=3e-4 lr_anneal=true
ctm            ctm            12 100000 64 0.999 dsm_adaptive=false dsm_sampler=lognormal target_inner=ema
ctm_adaptive   ctm            12 100000 64 0.999 dsm_adaptive=true dsm_sampler=lognormal target_inner=ema
sid_ref        sid            12 100000 32 ref   lr=1e-4 fake_lr=1e-4
dmd2_ref       dmd2           12 100000 32 ref   lr=1e-4 fake_lr=1e-4 warmup=100 gen_gan_weight=0.03
diff_instruct_ref diff_instruct 12 100000 32 ref lr=1e-4 fake_lr=1e-4
dmd_ref        dmd            12 100000 32 ref   lr=1e-4 fake_lr=1e-4
ctm_ref        ctm            12 100000 64 ref
dmd2_f2_ref    dmd2           12 100000 32 ref   lr=1e-4 fake_lr=1e-4 warmup=100 gen_gan_weight=0.03 fake_updates=2
lcm_w1_ref     lcm            10 100000 64 ref   guidance=1,3 sample_guidance=1 lr=4e-4
add_ref        add            12 100000 64 ref   lr=1e-4 d_lr=1e-3
ladd_ref       ladd           12 100000 64 ref   lr=3e-5 d_lr=1e-3 disc_m=-1
ufogen_ref     ufogen         12 100000 64 ref   lr=1e-4 d_lr=1e-3 chain_sigmas=7.3,0.35,0.1,0.03
lightning_ref  lightning      15 2400   64 ref   start_steps=16 steps_per_round=600 mse_rounds=1 mse_weight=1 lr=3e-4 lr_anneal=true d_lr=1e-3
kd_snap        kd             12 100000 64 ref   snapshot_minutes=1,2,4,6,8,10
cd_snap        cd             12 100000 64 ref   snapshot_minutes=1,2,4,6,8,10
sid_snap       sid            12 100000 32 ref   lr=1e-4 fake_lr=1e-4 snapshot_minutes=1,2,4,6,8,10
dmd2_snap      dmd2           12 100000 32 ref   lr=1e-4 fake_lr=1e-4 warmup=100 gen_gan_weight=0.03 snapshot_minutes=1,2,4,6,8,10
kd-dmd2        dmd2           12 100000 32 ref   init=kd_snap lr=1e-4 fake_lr=1e-4 warmup=100 gen_gan_weight=0.03 snapshot_minutes=1,2,4,6,8,10
kd-sid         sid            12 100000 32 ref   init=kd_snap sigma_init=80 lr=1e-4 fake_lr=1e-4 snapshot_minutes=1,2,4,6,8,10
cd-ladd        ladd           12 100000 64 ref   init=cd_snap lr=3e-5 d_lr=1e-3 disc_m=-1 times=1,0.75,0.5,0.25 snapshot_minutes=1,2,4,6,8,10
lcmdiag_cd     cd             4  100000 64 ref
lcmdiag_grid   cd             4  100000 64 ref   num_scales=1000 skip=20
lcmdiag_ddim   cd             4  100000 64 ref   num_scales=1000 skip=20 solver=ddim distance=huber
lcmdiag_w1     lcm            4  100000 64 ref   guidance=1,3 sample_guidance=1 lr=4e-4
lcmdiag_w1_18  lcm            4  100000 64 ref   guidance=1,3 sample_guidance=1 lr=4e-4 num_scales=18 skip=1 solver=heun distance=l2
add            add            12 100000 64 0.999 lr=1e-4 d_lr=1e-4 distill_weight=10 distill_reduce=mean
add_tuned      add            12 100000 64 0     lr=1e-4 d_lr=1e-3 distill_weight=10 distill_reduce=mean
add_d3_ema     add            12 100000 64 0.999 lr=1e-4 d_lr=1e-3 distill_weight=10 distill_reduce=mean
ladd           ladd           12 100000 64 0.999 lr=1e-4 d_lr=1e-4
ladd_tuned     ladd           12 100000 64 0     lr=3e-5 d_lr=1e-3 disc_m=-1
ufogen         ufogen         12 100000 64 0.999 lr=1e-4 d_lr=1e-4
ufogen_tuned   ufogen         12 100000 64 0     lr=1e-4 d_lr=1e-3 chain_sigmas=7.3,0.35,0.1,0.03
lightning      lightning      12 2800   64 0     start_steps=16 end_steps=1 steps_per_round=700 lr=1e-4 d_lr=1e-4
lightning_pd   lightning      15 2400   64 0     start_steps=16 steps_per_round=600 mse_rounds=1 mse_weight=1 lr=3e-4 lr_anneal=true d_lr=1e-3
compress_q     compress       6  100000 64 ref   student_net=quarter
compress_q_nofeat compress    6  100000 64 ref   student_net=quarter lambda_feat=0
compress_h     compress       6  100000 64 ref   student_net=half
cd_q           cd             12 100000 64 ref   init=compress_q
cd_h           cd             12 100000 64 ref   init=compress_h
kd_q           kd             12 100000 64 ref   student_net=quarter
kd_h           kd             12 100000 64 ref   student_net=half
dmd2_q         dmd2           12 100000 32 ref   init=compress_q lr=1e-4 fake_lr=1e-4 warmup=100 gen_gan_weight=0.03
cd_lora4       cd             12 100000 64 ref   lora_rank=4
cd_lora16      cd             12 100000 64 ref   lora_rank=16
compress_q12   compress       12 100000 64 ref   student_net=quarter lambda_feat=0
cd_q12         cd             12 100000 64 ref   init=compress_q12
scd            scd            15 100000 64 ref   warmup=500
scd_fd         scd            15 100000 64 ref   warmup=500 tangent=fd
ect            ect            15 100000 64 ref   stage_iters=750
tcm            tcm            15 100000 64 ref   init=ect start_stage=8 stage_iters=750
meanflow       meanflow       15 100000 64 ref
meanflow_c     meanflow       15 100000 64 ref   p_mean=-0.6 p_std=1.6 r_p_mean=-4.0
imf            meanflow       15 100000 64 ref   objective=imf equal_share=0.5 p_mean=-0.6 p_std=1.6 r_p_mean=-4.0
fdistill       fdistill       15 100000 32 ref   lr=1e-4 fake_lr=1e-4 warmup=100
fdistill_kl    fdistill       15 100000 32 ref   lr=1e-4 fake_lr=1e-4 warmup=100 f=kl
sida           sida           15 100000 32 ref   lr=1e-4 fake_lr=1e-4 gan_start_kimg=20
sida_g0        sida           15 100000 32 ref   lr=1e-4 fake_lr=1e-4 gan_start_kimg=0
sid2a          sida           15 100000 32 ref   init=sid_snap lr=1e-4 fake_lr=1e-4 gan_start_kimg=20
reflow         reflow         15 100000 64 ref
reflow_distill reflow         15 100000 64 ref   init=reflow phase=distill pairs_from=init
reflow2        reflow         15 100000 64 ref   init=reflow pairs_from=init
reflow2_distill reflow        15 100000 64 ref   init=reflow2 phase=distill pairs_from=init
perflow        perflow        15 100000 64 ref   dropout=0.1
perflow_lr     perflow        15 100000 64 ref   lr=2e-4 warmup=100 dropout=0.1
perflow_d0     perflow        15 100000 64 ref
boot           boot           15 100000 64 ref
boot_heun      boot           15 100000 64 ref   solver=heun
traflow        traflow        15 100000 64 ref
traflow_snap   traflow        15 100000 64 ref   snapshot_minutes=3,6,9,12
dsno           dsno           15 100000 32 ref   warmup=500
"
for want in "$@"; do
  line=$(echo "$RUNS" | awk -v n="$want" '$1 == n')
  [ -n "$line" ] || { echo "unknown run $want" >&2; exit 2; }
  read -r name method minutes steps batch ema opts <<<"$line"
  sets=(); for kv in $opts; do
    case $kv in init=*) sets+=(--init "$ROOT/${kv#init=}");; *) sets+=(--set "$kv");; esac
  done
  $FEWSTEP distill --teacher builtin:digits --method "$method" --out "$ROOT/$name" --overwrite \
    --minutes "$minutes" --max-steps "$steps" --batch "$batch" --checkpoint-every 100000 \
    $( [ "$ema" = ref ] || echo --set ema_decay="$ema" --set ema_rampup=none ) "${sets[@]}"
  $FEWSTEP eval "$ROOT/$name" ${EVAL_ARGS:-}
done
