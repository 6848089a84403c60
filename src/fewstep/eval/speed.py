"""Speed and cost of a sampler: NFE, latency per batch, samples per second, peak memory; and the
cost of a distillation read from its run directory.

Latency is the median over repeats after one warm-up batch. Peak memory is the accelerator's
``max_memory_allocated`` on CUDA; on CPU it is the growth of the process's peak resident set
(``VmHWM``, reset through ``/proc/self/clear_refs`` on Linux) while the sampler runs — an upper
bound that includes allocator slack.
"""

from __future__ import annotations

import re
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fewstep.eval.sampling import Sampler
from fewstep.seeding import seeded_labels, seeded_noise


@dataclass
class Speed:
    nfe: int
    batch: int
    latency_s: float  # median seconds per batch
    samples_per_s: float
    peak_mem_mb: float | None

    def to_dict(self) -> dict:
        return asdict(self)


def _rss_peak_kb() -> int | None:
    try:
        return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))
    except (OSError, AttributeError):
        return None


def _reset_rss_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _rss_now_kb() -> int | None:
    try:
        return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))
    except (OSError, AttributeError):
        return None


@torch.no_grad()
def measure_speed(
    sampler: Sampler,
    sample_shape: tuple[int, ...],
    num_classes: int = 0,
    batch: int = 256,
    repeats: int = 5,
    device: str | torch.device = "cpu",
) -> Speed:
    """Time ``repeats`` batches of ``batch`` samples (after one warm-up) and measure peak memory."""
    seeds = range(batch)
    z = seeded_noise(seeds, tuple(sample_shape)).to(device)
    y = seeded_labels(seeds, num_classes)
    y = None if y is None else y.to(device)
    cuda = torch.device(device).type == "cuda"
    sampler.fn(z, y)  # warm-up
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        can_reset = _reset_rss_peak()
        base = _rss_now_kb()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sampler.fn(z, y)
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    if cuda:
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:
        hwm = _rss_peak_kb()
        peak = (hwm - base) / 1024 if (can_reset and hwm is not None and base is not None) else None
    latency = statistics.median(times)
    return Speed(sampler.nfe, batch, latency, batch / latency, peak)


def run_cost(run_dir: str | Path) -> dict:
    """Distillation wall time and optimizer steps of a run, from its ``metrics.jsonl`` (last
    record) and ``config.json``; missing fields are ``None``."""
    import json

    run_dir = Path(run_dir)
    out: dict = {"minutes": None, "steps": None}
    log = run_dir / "metrics.jsonl"
    if log.is_file():
        last = None
        for line in log.read_text().splitlines():
            line = line.strip()
            if line:
                try:
                    last = json.loads(line)
                except json.JSONDecodeError:
                    continue
        if last:
            out["steps"] = last.get("step", last.get("iteration"))
            secs = last.get("elapsed_s", last.get("time_s", last.get("seconds")))
            out["minutes"] = round(secs / 60, 2) if secs is not None else last.get("minutes")
    return out
