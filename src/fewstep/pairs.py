"""Offline (noise, teacher ODE sample) pairs: generated once, stored in shards, reused.

Knowledge distillation (Luhman & Luhman 2021, arXiv 2101.02388) regresses a one-step student onto
these pairs; DMD's regression loss (Yin et al. 2023, arXiv 2311.18828, Eq. 6) and rectified-flow
reflow (Liu et al. 2022, arXiv 2209.03003) reuse them.

Format of a pairs folder (plain safetensors + JSON, nothing pickled)::

    pairs.json                  {"format": "fewstep-pairs", "version": 1, "n": N, "shard_size": S,
                                 "solver": "heun", "steps": 18, "guidance": 1.0, "seed": s0,
                                 "sample_shape": [...], "num_classes": C, "sigma_max": ...,
                                 "nfe": ..., "teacher": "<spec>", "teacher_sha256": "..."}
    shard-00000.safetensors     index  (m,)        int64    sample index i (seed s0 + i)
                                noise  (m, *shape) float32  unit Gaussian z of index i
                                x0     (m, *shape) float32  teacher ODE sample from sigma_max * z
                                labels (m,)        int64    class of index i (conditional teachers)

Shard ``k`` holds indices ``[k S, min((k+1) S, N))``. Noise and labels of index ``i`` come from
:mod:`fewstep.seeding`, so pair ``i`` is the same whatever the number of processes. Each shard is
written atomically, so a shard file on disk is complete; generation skips complete shards and
resumes where it stopped. Process ``rank`` of ``world`` generates shards ``k`` with
``k % world == rank`` (torchrun/accelerate set ``RANK``/``WORLD_SIZE``).
"""

from __future__ import annotations

import hashlib
import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fewstep.denoiser import Denoiser
from fewstep.errors import FewstepError
from fewstep.io import atomic_write_json, cache_dir, load_tensors, read_json, save_tensors

FORMAT = "fewstep-pairs"
VERSION = 1
# settings that must match for a folder to be resumed or reused
_KEYS = ("n", "shard_size", "solver", "steps", "guidance", "seed", "sample_shape", "num_classes", "teacher_sha256")


def teacher_fingerprint(teacher: Denoiser) -> str:
    """SHA-256 over the teacher's parameters and buffers (names, shapes, bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(teacher.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def shard_path(folder: Path, k: int) -> Path:
    return folder / f"shard-{k:05d}.safetensors"


def dist_rank_world() -> tuple[int, int]:
    """``(rank, world)`` from the environment torchrun / accelerate set, else ``(0, 1)``."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _check_meta(folder: Path, meta: dict[str, Any]) -> None:
    old = read_json(folder / "pairs.json")
    if old.get("format") != FORMAT:
        raise FewstepError(f"{folder}/pairs.json is not a fewstep pairs file; pick another --out")
    diff = [k for k in _KEYS if old.get(k) != meta[k]]
    if diff:
        k = diff[0]
        raise FewstepError(
            f"{folder} holds pairs made with {k}={old.get(k)!r}, not {meta[k]!r}; "
            "use the same settings to resume, or another --out"
        )


@torch.no_grad()
def generate_pairs(
    teacher: Denoiser,
    out: str | Path,
    n: int,
    solver: str = "heun",
    steps: int = 18,
    guidance: float = 1.0,
    seed: int = 0,
    shard_size: int = 1024,
    batch: int = 256,
    rank: int | None = None,
    world: int | None = None,
    teacher_name: str = "",
    device: str | torch.device | None = None,
    progress: bool = True,
) -> Path:
    """Generate this process's shards of ``n`` pairs into ``out`` (skipping complete ones).

    Args:
        teacher: the frozen teacher denoiser.
        out: the pairs folder (created; an existing one must hold pairs of the same settings).
        n: total number of pairs over all processes.
        solver, steps: the ODE solver and its number of steps on the teacher's Karras grid.
        guidance: classifier-free guidance scale of the teacher (1 = conditional).
        seed: pair ``i`` uses seed ``seed + i``.
        shard_size: pairs per shard file; batch: pairs per teacher call (within a shard).
        rank, world: this process and the number of processes (default from ``RANK``/``WORLD_SIZE``).
    Returns:
        ``out`` as a :class:`Path`.
    """
    from tqdm.auto import tqdm

    from fewstep.guidance import cfg
    from fewstep.seeding import seeded_labels, seeded_noise
    from fewstep.solvers import get_solver, nfe, sample

    get_solver(solver)
    if n < 1 or shard_size < 1 or batch < 1 or steps < 1:
        raise FewstepError(f"n, steps, shard_size and batch must be >= 1 (got {n}, {steps}, {shard_size}, {batch})")
    env_rank, env_world = dist_rank_world()
    rank = env_rank if rank is None else rank
    world = env_world if world is None else world
    if not 0 <= rank < world:
        raise FewstepError(f"--rank must lie in [0, --world), got rank={rank}, world={world}")
    if guidance != 1.0 and not teacher.num_classes:
        raise FewstepError("--guidance needs a class-conditional teacher; this one has no labels")
    out = Path(out)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "n": int(n),
        "shard_size": int(shard_size),
        "solver": solver,
        "steps": int(steps),
        "guidance": float(guidance),
        "seed": int(seed),
        "sample_shape": list(teacher.sample_shape),
        "num_classes": int(teacher.num_classes),
        "sigma_max": float(teacher.sigma_max),
        "nfe": nfe(solver, steps) if solver != "reference" else None,
        "teacher": teacher_name,
        "teacher_sha256": teacher_fingerprint(teacher),
    }
    if (out / "pairs.json").is_file():
        _check_meta(out, meta)
    else:
        atomic_write_json(out / "pairs.json", meta)
    if device is None:  # one GPU per process under torchrun / accelerate
        device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    den = cfg(teacher, guidance) if teacher.num_classes else teacher
    den = den.to(device)
    mine = list(range(rank, -(-n // shard_size), world))
    todo = [k for k in mine if not shard_path(out, k).is_file()]
    for k in todo:  # leftovers of an atomic write killed before its rename
        for stale in out.glob(f".{shard_path(out, k).name}.*.tmp"):
            stale.unlink(missing_ok=True)
    total = sum(min(shard_size, n - k * shard_size) for k in todo)
    bar = tqdm(
        total=total, desc=f"pairs [rank {rank}/{world}]", unit="pair", disable=not progress or total == 0, position=rank
    )
    for k in todo:
        idx = list(range(k * shard_size, min((k + 1) * shard_size, n)))
        zs, xs, ys = [], [], []
        for lo in range(0, len(idx), batch):
            seeds = [seed + i for i in idx[lo : lo + batch]]
            z = seeded_noise(seeds, teacher.sample_shape)
            y = seeded_labels(seeds, teacher.num_classes)
            x0, _ = sample(den, z.to(device), solver, steps, None if y is None else y.to(device))
            zs.append(z)
            xs.append(x0.float().cpu())
            ys.append(y)
            bar.update(len(seeds))
        tensors = {"index": torch.tensor(idx, dtype=torch.int64), "noise": torch.cat(zs), "x0": torch.cat(xs)}
        if teacher.num_classes:
            tensors["labels"] = torch.cat(ys)
        save_tensors(shard_path(out, k), tensors)
    bar.close()
    return out


@dataclass
class Pairs:
    """All pairs of a folder, in memory: ``noise`` and ``x0`` ``(N, *shape)``, ``labels`` ``(N,)``."""

    noise: Tensor
    x0: Tensor
    labels: Tensor | None
    meta: dict[str, Any]

    def __len__(self) -> int:
        return self.noise.shape[0]

    def batch(self, size: int, device: torch.device | str | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
        """A random batch ``(noise, x0, labels)`` drawn with replacement from torch's global RNG."""
        idx = torch.randint(len(self), (size,))
        labels = None if self.labels is None else self.labels[idx].to(device)
        return self.noise[idx].to(device), self.x0[idx].to(device), labels


def load_pairs(folder: str | Path) -> Pairs:
    """Load a complete pairs folder; name the missing shards if generation has not finished."""
    folder = Path(folder)
    if not (folder / "pairs.json").is_file():
        raise FewstepError(f"{folder} holds no pairs.json; generate pairs with `fewstep pairs --out {folder}`")
    meta = read_json(folder / "pairs.json")
    if meta.get("format") != FORMAT:
        raise FewstepError(f"{folder}/pairs.json is not a fewstep pairs file")
    n, s = int(meta["n"]), int(meta["shard_size"])
    paths = [shard_path(folder, k) for k in range(-(-n // s))]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise FewstepError(
            f"{folder} is incomplete ({len(missing)} of {len(paths)} shards missing, first {missing[0]}); "
            "rerun the same `fewstep pairs` command to finish it"
        )
    shards = [load_tensors(p) for p in paths]
    index = torch.cat([t["index"] for t in shards])
    if not torch.equal(index, torch.arange(n)):
        raise FewstepError(f"{folder}: shard indices do not cover 0..{n - 1}; regenerate the folder")
    labels = torch.cat([t["labels"] for t in shards]) if meta["num_classes"] else None
    return Pairs(torch.cat([t["noise"] for t in shards]), torch.cat([t["x0"] for t in shards]), labels, meta)


def check_pairs_fit(pairs: Pairs, teacher: Denoiser) -> None:
    """Refuse pairs made by another teacher (shape, classes or weights differ)."""
    m = pairs.meta
    if tuple(m["sample_shape"]) != tuple(teacher.sample_shape) or m["num_classes"] != teacher.num_classes:
        raise FewstepError(
            f"pairs of shape {m['sample_shape']} with {m['num_classes']} classes do not fit a teacher of shape "
            f"{list(teacher.sample_shape)} with {teacher.num_classes}; generate pairs with this teacher"
        )
    if m.get("teacher_sha256") != teacher_fingerprint(teacher):
        raise FewstepError(
            f"these pairs were made by another teacher ({m.get('teacher') or 'unnamed'}); "
            "generate pairs with this teacher (`fewstep pairs --teacher ...`)"
        )


def default_pairs_dir(teacher: Denoiser, n: int, solver: str, steps: int, guidance: float) -> Path:
    """A cache folder for pairs a method generates itself (``$FEWSTEP_CACHE`` or ``~/.cache/fewstep``)."""
    root = cache_dir()
    key = f"{teacher_fingerprint(teacher)[:16]}-{solver}{steps}-w{guidance:g}-n{n}"
    return root / "pairs" / key


def ensure_pairs(
    teacher: Denoiser,
    folder: str | Path | None,
    n: int,
    solver: str = "heun",
    steps: int = 18,
    guidance: float = 1.0,
    teacher_name: str = "",
) -> Pairs:
    """Load ``folder``; if it is ``None``, generate (or resume) ``n`` pairs in the cache and load them."""
    if folder is not None:
        return load_pairs(folder)
    path = default_pairs_dir(teacher, n, solver, steps, guidance)
    device = next(itertools.chain(teacher.parameters(), teacher.buffers()), torch.empty(0)).device
    generate_pairs(teacher, path, n, solver, steps, guidance, teacher_name=teacher_name, device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()  # every process made its shards; now all are on disk
    return load_pairs(path)


__all__ = [
    "Pairs",
    "check_pairs_fit",
    "default_pairs_dir",
    "ensure_pairs",
    "generate_pairs",
    "load_pairs",
    "teacher_fingerprint",
]


class PairSource:
    """The teacher pairs of a method (KD, DMD's regression term, LADD's data), read or generated when
    the method first needs them — loading a run to sample never does that work. ``given`` is a
    :class:`Pairs` object (its shape is checked at once, and its teacher where it names one), else
    ``config.pairs`` (a folder made by ``fewstep pairs``) or ``config.num_pairs`` pairs generated into
    the cache once with ``config.solver``/``solver_steps``/``guidance``; those are checked against
    the teacher (shape, classes, weights) when first read."""

    def __init__(self, teacher: Denoiser, config: Any, given: Pairs | None = None) -> None:
        self.teacher, self.config, self.pairs, self.checked = teacher, config, given, False
        if given is not None:
            m = given.meta
            if tuple(m["sample_shape"]) != tuple(teacher.sample_shape):
                raise FewstepError(
                    f"pairs of shape {m['sample_shape']} do not fit a teacher of shape {list(teacher.sample_shape)}; "
                    "generate them with this teacher"
                )
            self.checked = "teacher_sha256" not in m  # hand-made pairs name no teacher to check

    def get(self) -> Pairs:
        c = self.config
        if self.pairs is None:
            self.pairs = ensure_pairs(self.teacher, c.pairs, c.num_pairs, c.solver, c.solver_steps, c.guidance)
        if not self.checked:
            check_pairs_fit(self.pairs, self.teacher)
            self.checked = True
        return self.pairs
