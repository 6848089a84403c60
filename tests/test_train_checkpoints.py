"""Checkpoints: flattened optimizer state, atomic commits, corruption fallback, exact resume
(in-process, after SIGTERM/SIGINT, and after SIGKILL of a real `fewstep distill` process)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from engine_helpers import Pair, PairConfig, assert_same, sigterm_at, state_of, tiny_config, tiny_data, tiny_teacher
from fewstep.errors import FewstepError
from fewstep.io import load_tensors
from fewstep.runs import checkpoints as runck
from fewstep.train import checkpoint as ckpt
from fewstep.train.loop import TrainingInterrupted, train


def everything(run_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of a run's newest checkpoint (weights, EMAs, optimizer state, counters)."""
    found = runck.latest(run_dir / "checkpoints")
    return {**found.tensors("weights.safetensors"), **found.tensors("optim.safetensors")}


@pytest.mark.parametrize("kind", [torch.optim.Adam, torch.optim.AdamW, torch.optim.RAdam])
def test_optimizer_state_round_trips_through_tensors_and_json(kind):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    opt = kind(net.parameters(), lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)
    for _ in range(3):
        opt.zero_grad()
        net(torch.randn(5, 3)).pow(2).mean().backward()
        opt.step()
    tensors, meta = ckpt.flatten_optimizer(opt, "opt.x")
    tensors = {k: v.clone() for k, v in tensors.items()}  # (they are the live state, as when saved)
    twin = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    twin.load_state_dict(net.state_dict())
    opt2 = kind(twin.parameters(), lr=1.0)
    ckpt.load_optimizer(opt2, tensors, meta, "opt.x")
    assert opt2.param_groups[0]["betas"] == (0.8, 0.95) and opt2.param_groups[0]["lr"] == 1e-2
    x = torch.randn(5, 3)
    for n, o in ((net, opt), (twin, opt2)):
        o.zero_grad()
        n(x).pow(2).mean().backward()
        o.step()
    assert_same(net.state_dict(), twin.state_dict())


def test_rng_state_round_trips():
    g = torch.Generator().manual_seed(3)
    tensors, meta = ckpt.rng_state(g)
    expected = (torch.rand(3), torch.rand(2, generator=g), np.random.rand(2), random.random())
    ckpt.set_rng_state(tensors, meta, g)
    again = (torch.rand(3), torch.rand(2, generator=g), np.random.rand(2), random.random())
    assert torch.equal(expected[0], again[0]) and torch.equal(expected[1], again[1])
    assert np.array_equal(expected[2], again[2]) and expected[3] == again[3]


def test_resume_continues_exactly(tmp_path):
    cfg = tiny_config(max_steps=12, checkpoint_every=5, log_every=3)
    whole = Pair(tiny_teacher(), PairConfig(b_every=2))
    train(whole, cfg, tmp_path / "whole", data=tiny_data())
    part = Pair(tiny_teacher(), PairConfig(b_every=2))
    train(part, tiny_config(max_steps=7, checkpoint_every=5, log_every=3), tmp_path / "split", data=tiny_data())
    assert runck.latest(tmp_path / "split" / "checkpoints").step == 7
    resumed = Pair(tiny_teacher(), PairConfig(b_every=2))
    summary = train(resumed, cfg, tmp_path / "split", data=tiny_data(), resume=True)
    assert summary["step"] == 12
    assert [i for i, _ in resumed.calls] == list(range(7, 12))
    assert_same(everything(tmp_path / "whole"), everything(tmp_path / "split"))
    # metrics of the resumed run continue the first part's records, none duplicated
    from fewstep.runs.folder import read_metrics

    assert [r["step"] for r in read_metrics(tmp_path / "split")] == [3, 6, 7, 9, 12]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_a_checkpoint_and_stops_cleanly(tmp_path, signum):
    cfg = tiny_config(max_steps=10, checkpoint_every=100)
    whole = Pair(tiny_teacher())
    train(whole, cfg, tmp_path / "whole", data=tiny_data())
    method = Pair(tiny_teacher())
    sigterm_at(method, 3) if signum == signal.SIGTERM else _sigint_at(method, 3)
    handler = signal.getsignal(signum)
    with pytest.raises(TrainingInterrupted) as e:
        train(method, cfg, tmp_path / "run", data=tiny_data())
    assert e.value.signum == signum and "--resume" in e.value.message
    assert signal.getsignal(signum) is handler  # the previous handler is back
    assert runck.latest(tmp_path / "run" / "checkpoints").step == 4  # the iteration in flight completed
    train(Pair(tiny_teacher()), cfg, tmp_path / "run", data=tiny_data(), resume=True)
    assert_same(everything(tmp_path / "whole"), everything(tmp_path / "run"))


def _sigint_at(method, step):
    inner = method.losses

    def losses(batch, i, due):
        if i == step:
            os.kill(os.getpid(), signal.SIGINT)
        return inner(batch, i, due)

    method.losses = losses


def test_only_the_last_k_checkpoints_are_kept(tmp_path):
    train(Pair(tiny_teacher()), tiny_config(max_steps=10, checkpoint_every=2, keep_checkpoints=2), tmp_path,
          data=tiny_data())  # fmt: skip
    assert [p.name for p in runck.checkpoint_dirs(tmp_path / "checkpoints")] == ["step-00000010", "step-00000008"]


@pytest.mark.parametrize("damage", ["garbage", "truncate", "delete", "state"])
def test_a_damaged_checkpoint_is_detected_and_the_previous_one_used(tmp_path, damage):
    train(Pair(tiny_teacher()), tiny_config(max_steps=10, checkpoint_every=5), tmp_path, data=tiny_data())
    newest = tmp_path / "checkpoints" / "step-00000010"
    target = newest / ("state.json" if damage == "state" else "weights.safetensors")
    if damage == "garbage":
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF  # one flipped byte in the middle of the tensors
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:100])
    elif damage in ("delete", "state"):
        target.unlink()
    with pytest.warns(runck.CheckpointWarning, match="step-00000010"):
        found = runck.latest(tmp_path / "checkpoints")
    assert found.step == 5
    # resuming uses the previous checkpoint and reproduces the uninterrupted run
    with pytest.warns(runck.CheckpointWarning):
        train(Pair(tiny_teacher()), tiny_config(max_steps=10, checkpoint_every=5), tmp_path, data=tiny_data(),
              resume=True)  # fmt: skip
    train(Pair(tiny_teacher()), tiny_config(max_steps=10, checkpoint_every=5), tmp_path / "ref", data=tiny_data())
    assert_same(everything(tmp_path / "ref"), everything(tmp_path))


def test_a_write_killed_midway_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    real = ckpt.write_tensors
    calls = {"n": 0}

    def dying(tmp, name, tensors, metadata=None):
        if name == "optim.safetensors":
            calls["n"] += 1
            if calls["n"] == 2:  # the second checkpoint dies after writing its weights
                raise KeyboardInterrupt("simulated kill")
        return real(tmp, name, tensors, metadata)

    monkeypatch.setattr(ckpt, "write_tensors", dying)
    with pytest.raises(KeyboardInterrupt):
        train(Pair(tiny_teacher()), tiny_config(max_steps=10, checkpoint_every=3), tmp_path, data=tiny_data())
    monkeypatch.setattr(ckpt, "write_tensors", real)
    root = tmp_path / "checkpoints"
    assert [p.name for p in runck.checkpoint_dirs(root)] == ["step-00000003"]
    assert (root / ".step-00000006.tmp" / "weights.safetensors").is_file()  # the half-written one, not committed
    assert runck.latest(root).step == 3
    train(Pair(tiny_teacher()), tiny_config(max_steps=10, checkpoint_every=3), tmp_path, data=tiny_data(), resume=True)
    assert not list(root.glob(".step-*.tmp"))  # stale staging folders are cleaned up by the next commit
    train(Pair(tiny_teacher()), tiny_config(max_steps=10, checkpoint_every=3), tmp_path / "ref", data=tiny_data())
    assert_same(everything(tmp_path / "ref"), everything(tmp_path))


def test_resume_rejects_a_checkpoint_of_another_method_or_shape(tmp_path):
    from fewstep.methods.denoise import Denoise

    train(Pair(tiny_teacher()), tiny_config(max_steps=5), tmp_path, data=tiny_data())
    with pytest.raises(FewstepError, match="is from method 'test-pair'"):
        train(Denoise(tiny_teacher()), tiny_config(max_steps=8), tmp_path, data=tiny_data(), resume=True)
    wider = Pair(tiny_teacher())
    wider.b = torch.nn.Linear(2, 2, bias=False)
    wider.b_ema = torch.nn.Linear(2, 2, bias=False)
    with pytest.raises(FewstepError, match="does not fit this run's net.b network"):
        train(wider, tiny_config(max_steps=8), tmp_path, data=tiny_data(), resume=True)
    with pytest.raises(FewstepError, match="no usable checkpoint"):
        train(Pair(tiny_teacher()), tiny_config(max_steps=8), tmp_path / "empty", data=tiny_data(), resume=True)


def newest_step(run_dir: Path) -> int:
    dirs = runck.checkpoint_dirs(run_dir / "checkpoints")
    return int(dirs[0].name.split("-")[1]) if dirs else -1


@pytest.mark.slow
def test_sigkill_at_any_moment_then_resume_is_bit_exact(tmp_path):
    """A real `fewstep distill` process is SIGKILLed at a random moment (checkpoints are written
    every 10 iterations and take most of the time, so kills mostly land inside writes) and
    resumed; the final weights, EMA and optimizer state equal those of an uninterrupted run with
    the same seed (run in this process: one thread, as the subprocess)."""
    from fewstep.cli import main
    from fewstep.teachers.native import save_model

    save_model(tiny_teacher(hidden=64), tmp_path / "teacher")
    args = ["distill", "--teacher", str(tmp_path / "teacher"), "--method", "denoise", "--data", "moons:2000",
            "--max-steps", "300", "--checkpoint-every", "10", "--batch", "16", "--seed", "7", "--set", "sample_n=0",
            "--set", "log_every=10", "--set", "cpu=true", "--set", "keep_checkpoints=2"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "killed"
    p = subprocess.Popen([sys.executable, "-m", "fewstep", *args, "--out", str(out)], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.monotonic() + 120
    while newest_step(out) < 0 and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.01)  # wait for the first checkpoint
    time.sleep(random.Random().uniform(0.0, 1.0))
    p.send_signal(signal.SIGKILL)
    assert p.wait() == -signal.SIGKILL, "the run ended before it could be killed; make it longer"
    assert 0 <= newest_step(out) <= 300  # a kill after the last checkpoint (while writing student/) counts too
    assert main([*args, "--out", str(tmp_path / "ref")]) == 0
    done = subprocess.run([sys.executable, "-m", "fewstep", *args, "--out", str(out), "--resume"], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert_same(everything(tmp_path / "ref"), everything(out))
    student = (out / "student" / "model.safetensors").read_bytes()
    assert student == (tmp_path / "ref" / "student" / "model.safetensors").read_bytes()
    assert load_tensors(out / "student" / "model.safetensors").keys() == state_of(tiny_teacher(hidden=64)).keys()


def test_a_methods_extra_state_survives_a_resume(tmp_path):
    class Counting(Pair):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.seen_batches = 0

        def losses(self, batch, step, due):
            self.seen_batches += 1
            return super().losses(batch, step, due)

        def extra_state(self):
            return {"seen_batches": self.seen_batches}

        def load_extra_state(self, state):
            self.seen_batches = state["seen_batches"]

    train(Counting(tiny_teacher()), tiny_config(max_steps=5, grad_accum=2), tmp_path, data=tiny_data())
    assert runck.latest(tmp_path / "checkpoints").meta["method_state"] == {"seen_batches": 10}
    resumed = Counting(tiny_teacher())
    train(resumed, tiny_config(max_steps=8, grad_accum=2), tmp_path, data=tiny_data(), resume=True)
    assert resumed.seen_batches == 16
