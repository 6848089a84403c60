"""Many processes through `accelerate launch` (2 CPU processes, gloo): FSDP2 (`fully_shard`) and
plain data parallelism each equal one process at the same global batch within float tolerance (an
FSDP run stopped half-way and resumed included); `fewstep distill` under FSDP equals the same
command under data parallelism, and its saved student loads in a single process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine_helpers import Pair, PairConfig, tiny_config, tiny_data, tiny_teacher
from fewstep.io import load_tensors
from fewstep.runs import checkpoints as runck
from fewstep.runs.folder import read_metrics
from fewstep.train.loop import train
from test_engine_ddp import free_port

TESTS = Path(__file__).parent
CFG = dict(max_steps=6, batch=8, checkpoint_every=3, log_every=3)

COMMON = """compute_environment: LOCAL_MACHINE
num_machines: 1
machine_rank: 0
num_processes: 2
mixed_precision: 'no'
use_cpu: true
"""
FSDP = (
    COMMON
    + """distributed_type: FSDP
fsdp_config:
  fsdp_version: 2
  fsdp_reshard_after_forward: true
  fsdp_state_dict_type: FULL_STATE_DICT
  fsdp_cpu_ram_efficient_loading: false
"""
)
DDP = COMMON + "distributed_type: MULTI_GPU\n"  # torchrun-style launcher; the run itself says cpu=True

SCRIPT = """
import json, sys, torch
sys.path.insert(0, {tests!r})
from engine_helpers import Pair, PairConfig, tiny_config, tiny_data, tiny_teacher
from fewstep.train.loop import train

torch.set_num_threads(1)
out, half = sys.argv[1], {cfg!r}["max_steps"] // 2
method = Pair(tiny_teacher(), PairConfig(b_every=2, grad_clip=0.5))
train(method, tiny_config(**{{**{cfg!r}, "max_steps": half}}), out, data=tiny_data())  # stop half-way,
method = Pair(tiny_teacher(), PairConfig(b_every=2, grad_clip=0.5))  # then resume a fresh method
train(method, tiny_config(**{cfg!r}), out, data=tiny_data(), resume=True)
rank = torch.distributed.get_rank()
frozen = list(method.teacher.parameters()) + list(method.frozen_head.parameters())
x = torch.randn(4, 2, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
sigma, labels = torch.ones(4), torch.tensor([0, 1, 0, 1])
method.teacher(x, sigma, labels).pow(2).sum().backward()  # through the sharded teacher's input
x_whole = x.detach().clone().requires_grad_(True)
tiny_teacher()(x_whole, sigma, labels).pow(2).sum().backward()
info = {{
    "student": type(method.student.weight).__name__,
    "local": list(getattr(method.student.weight, "_local_tensor", method.student.weight).shape),
    "frozen_sharded": [type(p).__name__ == "DTensor" and p.to_local().numel() < p.numel() for p in frozen],
    "ema_sharded": [type(p).__name__ == "DTensor" and p.to_local().numel() < p.numel()
                    for p in method.b_ema.parameters()],
    "frozen_grads": [p.grad is not None or p.requires_grad for p in [*frozen, *method.b_ema.parameters()]],
    "input_grad": (x.grad - x_whole.grad).abs().max().item(),
}}
with open(f"{{out}}-rank{{rank}}.json", "w") as f:
    json.dump(info, f)
"""


TEARDOWN_ABORT = "terminate called without an active exception"


def launch(tmp_path: Path, config: str, *args: str, out: Path | None = None) -> None:
    """Run ``args`` under ``accelerate launch``. A gloo process can abort at interpreter exit with
    its threads still alive (torch's teardown, seen about once in ten CI runs of a 2-process job);
    such a run is repeated once from scratch (a distill run with ``--overwrite``; a script's run
    folder ``out`` is deleted first, or the repeat would append to its metrics), any other failure
    — or a second abort — fails the test."""
    (tmp_path / "acc.yaml").write_text(config)
    accelerate = Path(sys.executable).parent / "accelerate"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for attempt in range(2):
        cmd = [str(accelerate), "launch", "--config_file", str(tmp_path / "acc.yaml"), "--main_process_ip",
               "127.0.0.1", "--main_process_port", str(free_port()), *args]  # fmt: skip
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
        if done.returncode == 0 or TEARDOWN_ABORT not in done.stderr or attempt == 1:
            break
        if out is not None:
            shutil.rmtree(out, ignore_errors=True)
        args = (*args, "--overwrite") if "distill" in args and "--overwrite" not in args else args
    assert done.returncode == 0, done.stderr[-3000:]


def assert_same_checkpoint(a: Path, b: Path, step: int) -> None:
    ca, cb = runck.latest(a), runck.latest(b)
    assert ca.step == cb.step == step and cb.meta["world_size"] == 2
    for name in ("weights.safetensors", "optim.safetensors"):
        ta, tb = ca.tensors(name), cb.tensors(name)
        assert ta.keys() == tb.keys()
        for k in ta:
            torch.testing.assert_close(tb[k], ta[k], rtol=1e-5, atol=1e-6, msg=k)


def assert_close_updates(tmp_path: Path) -> None:
    """SiD under FSDP and under data parallelism: each network's change from the teacher it was
    copied from agrees within 5% (relative L2; a gradient that is not averaged over the processes
    differs by far more), and so do the logged losses."""
    a = runck.latest(tmp_path / "ddp" / "checkpoints").tensors("weights.safetensors")
    b = runck.latest(tmp_path / "fsdp" / "checkpoints").tensors("weights.safetensors")
    init = load_tensors(tmp_path / "teacher" / "model.safetensors")
    assert a.keys() == b.keys()
    for prefix in ("net.student.net.", "net.fake_score.", "eval_ema.net."):
        keys = [k for k in a if k.startswith(prefix)]
        change = sum((a[k] - init[k[len(prefix) :]]).pow(2).sum() for k in keys).sqrt()
        gap = sum((a[k] - b[k]).pow(2).sum() for k in keys).sqrt()
        assert change > 1e-3 and gap < 0.05 * change, (prefix, float(gap), float(change))
    for ra, rb in zip(read_metrics(tmp_path / "ddp"), read_metrics(tmp_path / "fsdp"), strict=True):
        for key in ("loss/student", "loss/fake_score"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-2, abs=1e-3), key


def pair_run(tmp_path: Path, config: str) -> None:
    """The two-optimizer Pair method (loss a also reaches b, so a gradient leak would show; its
    losses depend on the data only; under FSDP its teacher and frozen head are sharded too) in 2
    processes under ``config``, stopped at step 3 and resumed, against 1 process: weights,
    optimizer state, logged statistics."""
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(tests=str(TESTS), cfg=CFG))
    launch(tmp_path, config, str(script), str(tmp_path / "two"), out=tmp_path / "two")
    one = Pair(tiny_teacher(), PairConfig(b_every=2, grad_clip=0.5))
    train(one, tiny_config(**CFG), tmp_path / "one", data=tiny_data())
    assert_same_checkpoint(tmp_path / "one" / "checkpoints", tmp_path / "two" / "checkpoints", 6)
    initial = Pair(tiny_teacher()).student.weight.detach()
    assert not torch.allclose(runck.latest(tmp_path / "one" / "checkpoints").tensors("weights.safetensors")[
        "net.student.weight"], initial)  # fmt: skip
    for ra, rb in zip(read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two"), strict=True):
        for key in ("loss/a", "loss/b", "grad_norm/a", "grad_norm/b"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-5), key


@pytest.mark.slow
def test_fsdp2_two_processes_equal_one_process(tmp_path):
    pair_run(tmp_path, FSDP)
    for rank in (0, 1):
        info = json.loads((tmp_path / f"two-rank{rank}.json").read_text())
        # the trainable networks were sharded (a 2x2 weight: one row per process), and so were the
        # frozen teacher and head (each process holds part of every parameter), which never get
        # gradients but pass them to their input as a whole teacher does; the EMA copy is sharded
        # like its source (its values equal the 1-process run's: assert_same_checkpoint)
        assert info["student"] == "DTensor" and info["local"] == [1, 2]
        assert all(info["frozen_sharded"]) and all(info["ema_sharded"]) and not any(info["frozen_grads"])
        assert info["input_grad"] < 1e-5


@pytest.mark.slow
def test_data_parallel_through_accelerate_launch_equals_one_process(tmp_path):
    pair_run(tmp_path, DDP)
    assert json.loads((tmp_path / "two-rank0.json").read_text())["student"] == "Parameter"


@pytest.mark.slow
@pytest.mark.parametrize("method", ["denoise", "sid"])
def test_fsdp2_command_line_run_equals_data_parallel_and_loads_in_one_process(tmp_path, method):
    """The documented command, for the engine's reference method and for SiD (a generator, a
    fake-score network with its own optimizer, the frozen teacher called by both); its reference
    is the same command under data parallelism (a method that draws noise uses each process's own
    random stream, so 1 process would differ). The student saved at the end is the evaluation EMA,
    gathered from the shards."""
    from fewstep.runs import load_run
    from fewstep.teachers.native import save_model

    teacher = str(save_model(tiny_teacher(), tmp_path / "teacher"))
    args = ["-m", "fewstep", "distill", "--teacher", teacher, "--method", method, "--data", "moons:500",
            "--batch", "8", "--max-steps", "4", "--set", "sample_n=0", "--set", "log_every=2",
            "--set", "cpu=true", "--set", "ema_decay=0.5"]  # fmt: skip
    if method == "sid":
        args += ["--set", "lr=1e-3", "--set", "fake_lr=1e-3"]
    launch(tmp_path, FSDP, *args, "--out", str(tmp_path / "fsdp"))
    launch(tmp_path, DDP, *args, "--out", str(tmp_path / "ddp"))
    if method == "denoise":
        assert_same_checkpoint(tmp_path / "ddp" / "checkpoints", tmp_path / "fsdp" / "checkpoints", 4)
    else:  # SiD's Adam has beta1 = 0 (sign-like steps), which amplifies the all-reduce/reduce-scatter
        assert_close_updates(tmp_path)  # rounding difference: compare the updates, not bits
    a, b = load_run(tmp_path / "ddp"), load_run(tmp_path / "fsdp")  # one process loads the FSDP run
    weights = runck.latest(tmp_path / "fsdp" / "checkpoints").tensors("weights.safetensors")
    saved = load_tensors(tmp_path / "fsdp" / "student" / "model.safetensors")
    for (k, va), vb in zip(a.student.state_dict().items(), b.student.state_dict().values(), strict=True):
        assert type(vb) is torch.Tensor
        torch.testing.assert_close(vb, weights[f"eval_ema.{k}"], rtol=0, atol=0, msg=k)
        if method == "denoise":
            torch.testing.assert_close(vb, va, rtol=1e-5, atol=1e-6, msg=k)
        torch.testing.assert_close(saved[k], vb, rtol=0, atol=0, msg=k)
    assert any(not torch.equal(weights[f"net.student.{k}"], saved[k]) for k in saved)  # the EMA, not the raw student
