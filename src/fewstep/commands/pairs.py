"""``fewstep pairs``: generate (noise, teacher ODE sample, label) pairs into a sharded folder.

Resumable (complete shards are skipped) and sharded across processes: under ``torchrun`` or
``accelerate launch`` each process takes its own shards; ``--rank``/``--world`` do the same by hand.
The folder format is documented in :mod:`fewstep.pairs`.
"""

from __future__ import annotations

from fewstep.errors import FewstepError


def run(args) -> int:
    from fewstep.pairs import dist_rank_world, generate_pairs, shard_path
    from fewstep.teachers import load_teacher

    if (args.rank is None) != (args.world is None):
        raise FewstepError("pass both --rank and --world, or neither (then RANK/WORLD_SIZE are used)")
    rank, world = (args.rank, args.world) if args.rank is not None else dist_rank_world()
    teacher = load_teacher(args.teacher)
    out = generate_pairs(
        teacher, args.out, args.n, args.solver, args.steps, args.guidance, args.seed, args.shard_size, args.batch,
        rank, world, teacher_name=str(args.teacher), device=args.device, progress=not args.quiet,
    )  # fmt: skip
    shards = -(-args.n // args.shard_size)
    done = sum(shard_path(out, k).is_file() for k in range(shards))
    print(f"rank {rank}/{world}: {done}/{shards} shards of {args.n} pairs in {out}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("pairs", help="generate (noise, teacher sample) pairs for KD, DMD and reflow")
    p.add_argument("--teacher", required=True, help="builtin:digits, analytic:NAME, or a model folder")
    p.add_argument("--n", type=int, required=True, help="number of pairs (over all processes)")
    p.add_argument("--out", required=True, help="pairs folder (rerun the same command to resume)")
    p.add_argument("--solver", default="heun", help="euler (=ddim), heun, dpmpp_2m, reference")
    p.add_argument("--steps", type=int, default=18, help="solver steps on the teacher's Karras grid")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (1 = conditional)")
    p.add_argument("--seed", type=int, default=0, help="pair i uses seed SEED+i")
    p.add_argument("--shard-size", type=int, default=1024, help="pairs per shard file")
    p.add_argument("--batch", type=int, default=256, help="pairs per teacher call")
    p.add_argument("--rank", type=int, default=None, help="this process (default: $RANK or 0)")
    p.add_argument("--world", type=int, default=None, help="number of processes (default: $WORLD_SIZE or 1)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
