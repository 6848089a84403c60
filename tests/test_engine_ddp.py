"""Many processes: the same loop under torchrun (2 CPU processes, gloo) equals one process at the
same global batch within float tolerance, with per-rank data shards and per-rank seeds."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine_helpers import Pair, PairConfig, tiny_config, tiny_data, tiny_teacher
from fewstep.runs import checkpoints as runck
from fewstep.runs.folder import read_metrics
from fewstep.train.loop import train

TESTS = Path(__file__).parent
CFG = dict(max_steps=6, batch=8, checkpoint_every=3, log_every=3)

SCRIPT = """
import json, sys, torch
sys.path.insert(0, {tests!r})
from engine_helpers import Pair, PairConfig, tiny_config, tiny_data, tiny_teacher
from fewstep.train.loop import train

torch.set_num_threads(1)
out = sys.argv[1]
method = Pair(tiny_teacher(), PairConfig(b_every=2, grad_clip=0.5))
inner = method.losses

def losses(batch, step, due):
    if step == 0:  # what this rank sees: its data shard and its own global RNG stream
        rank = torch.distributed.get_rank()
        info = {{"rank": rank, "x": batch.x.tolist(), "rand": torch.rand(()).item(), "size": batch.size}}
        with open(f"{{out}}-rank{{rank}}.json", "w") as f:
            json.dump(info, f)
    return inner(batch, step, due)

method.losses = losses
train(method, tiny_config(**{cfg!r}), out, data=tiny_data())
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_equal_one_process_at_the_same_global_batch(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(tests=str(TESTS), cfg=CFG))
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           str(script), str(tmp_path / "two")]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]

    one = Pair(tiny_teacher(), PairConfig(b_every=2, grad_clip=0.5))
    train(one, tiny_config(**CFG), tmp_path / "one", data=tiny_data())

    a = runck.latest(tmp_path / "one" / "checkpoints")
    b = runck.latest(tmp_path / "two" / "checkpoints")
    assert a.step == b.step == 6 and b.meta["world_size"] == 2
    for name in ("weights.safetensors", "optim.safetensors"):
        ta, tb = a.tensors(name), b.tensors(name)
        assert ta.keys() == tb.keys()
        for k in ta:
            torch.testing.assert_close(tb[k], ta[k], rtol=1e-5, atol=1e-6, msg=k)
    initial = Pair(tiny_teacher()).student.weight.detach()  # (tiny_teacher seeds the construction)
    assert not torch.allclose(a.tensors("weights.safetensors")["net.student.weight"], initial)
    assert (tmp_path / "two" / "checkpoints" / "step-00000006" / "rng-1.safetensors").is_file()

    # logged losses and gradient norms are those of the full batch: gradients are averaged, not
    # summed (Adam alone would not tell: it is invariant to the gradient's scale)
    for ra, rb in zip(read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two"), strict=True):
        assert ra["step"] == rb["step"]
        for key in ("loss/a", "loss/b", "grad_norm/a", "grad_norm/b"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-5), key

    # each rank got its own half of the global batch, and its own random stream
    r0, r1 = (json.loads((tmp_path / f"two-rank{r}.json").read_text()) for r in (0, 1))
    assert r0["size"] == r1["size"] == 4
    assert r0["x"] != r1["x"] and r0["rand"] != r1["rand"]
    from fewstep.train.feed import Feeder
    from fewstep.train.loop import DATA_STREAM, derive_seed

    full = Feeder(tiny_data(), 2, 8, 0, 1, 1, derive_seed(0, DATA_STREAM), "cpu").iteration()[0]
    assert full.x.tolist() == r0["x"] + r1["x"]
