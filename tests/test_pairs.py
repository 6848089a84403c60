"""Pair generation: equal to a direct solver call, resumable, independent of the sharding."""

import pytest
import torch

from fewstep.cli import main
from fewstep.errors import FewstepError
from fewstep.pairs import generate_pairs, load_pairs, shard_path
from fewstep.seeding import seeded_labels, seeded_noise
from fewstep.solvers import sample
from fewstep.teachers.analytic import ring2d


def teacher():
    return ring2d(k=4, std=0.1)


def test_pairs_equal_a_direct_solver_call(tmp_path):
    t = teacher()
    generate_pairs(t, tmp_path, n=10, solver="heun", steps=6, seed=3, shard_size=4, batch=4, progress=False)
    p = load_pairs(tmp_path)
    assert len(p) == 10 and p.meta["nfe"] == 11 and p.labels is not None
    seeds = range(3, 13)
    z, y = seeded_noise(seeds, (2,)), seeded_labels(seeds, 4)
    x, _ = sample(t, z, "heun", 6, y)
    assert torch.equal(p.noise, z) and torch.equal(p.labels, y)
    torch.testing.assert_close(p.x0, x, rtol=1e-5, atol=1e-6)
    # the teacher's classes hold: each sample lands near its own class's mode
    assert (t.component(p.x0) == p.labels).all()


def test_two_ranks_equal_one_and_resume_after_interruption(tmp_path):
    t = teacher()
    kw = dict(n=11, solver="euler", steps=5, shard_size=3, batch=2, progress=False)
    generate_pairs(t, tmp_path / "one", **kw)
    for r in (1, 0):
        generate_pairs(t, tmp_path / "two", rank=r, world=2, **kw)
    a, b = load_pairs(tmp_path / "one"), load_pairs(tmp_path / "two")
    assert torch.equal(a.x0, b.x0) and torch.equal(a.noise, b.noise) and torch.equal(a.labels, b.labels)

    # interrupted run: rank 0 of 2 finished, a half-written temp file left behind
    generate_pairs(t, tmp_path / "r", rank=0, world=2, **kw)
    with pytest.raises(FewstepError, match="incomplete"):
        load_pairs(tmp_path / "r")
    (tmp_path / "r" / ".shard-00001.safetensors.abc.tmp").write_bytes(b"partial")
    done = shard_path(tmp_path / "r", 0).stat().st_mtime_ns
    generate_pairs(t, tmp_path / "r", **kw)
    assert shard_path(tmp_path / "r", 0).stat().st_mtime_ns == done  # complete shards are skipped
    assert not list((tmp_path / "r").glob("*.tmp"))
    assert torch.equal(load_pairs(tmp_path / "r").x0, a.x0)


def test_settings_mismatch_is_refused(tmp_path):
    generate_pairs(teacher(), tmp_path, n=4, steps=3, progress=False)
    with pytest.raises(FewstepError, match="steps=3"):
        generate_pairs(teacher(), tmp_path, n=4, steps=4, progress=False)


def test_cli_pairs(tmp_path, capsys):
    out = tmp_path / "p"
    args = ["pairs", "--teacher", "analytic:gaussians8", "--n", "6", "--steps", "4", "--shard-size", "4", "--quiet"]
    assert main([*args, "--out", str(out), "--rank", "0", "--world", "2"]) == 0
    assert "1/2 shards" in capsys.readouterr().out
    assert main([*args, "--out", str(out)]) == 0
    assert len(load_pairs(out)) == 6
    assert main([*args, "--out", str(out), "--rank", "0"]) == 2
