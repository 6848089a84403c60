"""Speed and cost of a sampler: NFE, latency per batch, samples per second, peak memory; and the
cost of a distillation read from its run directory.

Latency is the median over repeats after one warm-up batch. Peak memory is the accelerator's
``max_memory_allocated`` on CUDA; on CPU it is the growth of the process's peak resident set
(``VmHWM``, reset through ``/proc/self/clear_refs`` on Linux) over the resident set before the
warm-up batch (after ``malloc_trim``), i.e. what the sampler's batch allocates, allocator slack
included.
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


def _malloc_trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the peak may then be underestimated
        pass


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
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        _malloc_trim()  # hand freed heap back to the OS so the sampler's allocations show as growth
        base = _rss_now_kb()
        can_reset = _reset_rss_peak()
    sampler.fn(z, y)  # warm-up
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
