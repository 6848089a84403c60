"""Warm-started chains (``--init``) and minute-mark checkpoints (``snapshot_minutes``)."""

from __future__ import annotations

import json

import pytest
import torch

from engine_helpers import tiny_data, tiny_teacher
from fewstep.errors import FewstepError
from fewstep.runs import checkpoints as runck
from fewstep.runs.folder import run_cost
from fewstep.students import ConsistencyStudent, OneStepGenerator
from fewstep.train import distill, load_run
from fewstep.train.warmstart import one_step_gap

FAST = {"batch": 8, "sample_n": 0, "cpu": True, "checkpoint_every": 1000}


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    from fewstep.teachers.native import save_model

    return str(save_model(tiny_teacher(), tmp_path_factory.mktemp("chain") / "teacher"))


@pytest.fixture(scope="module")
def kd_run(teacher_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("chain") / "kd"
    distill(teacher_dir, "kd", max_steps=6, out=out, num_pairs=64, solver_steps=3, **FAST)
    return out


@pytest.fixture(scope="module")
def cd_run(teacher_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("chain") / "cd"
    distill(teacher_dir, "cd", max_steps=6, out=out, data=tiny_data(), **FAST)
    return out


def weights(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def start(method: str, init, **options):
    """The method a chain would train, built around ``init``'s student (before any step)."""
    from fewstep.methods import get_method
    from fewstep.options import build
    from fewstep.train.warmstart import warm_start

    cls = get_method(method)
    before = load_run(init)
    return before, *warm_start(cls, before.teacher, build(cls.Config, options, method), init)


def test_kd_to_dmd2_starts_from_the_kd_student_and_counts_the_whole_chain(teacher_dir, kd_run, tmp_path):
    before, m, record = start("dmd2", kd_run, gan=False)
    assert isinstance(m.student, type(before.student.net))  # dmd2's denoiser is kd's inner network
    for k, v in weights(before.student.net).items():
        assert torch.equal(m.student.state_dict()[k], v), k
    assert one_step_gap(before, m) == 0.0 and record["one_step_gap"] == 0.0  # G(80 z, 80) in both runs
    assert m.student.training and all(p.requires_grad for p in m.student.parameters())
    assert not any(p.requires_grad for p in m.teacher.parameters())

    out = tmp_path / "kd-dmd2"
    distill(teacher_dir, "dmd2", max_steps=3, out=out, init=str(kd_run), gan=False, **FAST)
    record = json.loads((out / "config.json").read_text())["init"]
    assert record["chain"] == ["kd"] and record["carried"] == ["student"] and record["layout"] is None
    own, first = run_cost(out), run_cost(kd_run)
    assert own["chain"] == ["kd", "dmd2"]
    assert own["minutes"] == pytest.approx(first["minutes"] + own["own_minutes"], abs=1e-3)
    assert own["steps"] == first["steps"] + 3


def test_a_chain_that_would_change_the_one_step_function_is_refused_with_the_fix(teacher_dir, kd_run, tmp_path):
    with pytest.raises(FewstepError, match="sigma_init=80 makes it exact"):
        distill(teacher_dir, "sid", max_steps=1, out=tmp_path / "a", init=str(kd_run), **FAST)
    assert not (tmp_path / "a").exists()  # nothing written
    distill(teacher_dir, "sid", max_steps=1, out=tmp_path / "b", init=str(kd_run), sigma_init=80.0, **FAST)
    with pytest.raises(FewstepError, match="cannot start from a run; methods that can: .*dmd2"):
        distill(teacher_dir, "progressive", max_steps=1, out=tmp_path / "c", init=str(kd_run), **FAST)
    with pytest.raises(FewstepError, match="not a fewstep run directory"):
        distill(teacher_dir, "dmd2", max_steps=1, out=tmp_path / "d", init=str(tmp_path / "nothing"), **FAST)
    with pytest.raises(FewstepError, match="is the run being written"):
        distill(teacher_dir, "dmd2", max_steps=1, out=kd_run, init=str(kd_run), overwrite=True, **FAST)
    assert load_run(kd_run).run.step == 6  # the kd run is untouched


def test_sid_to_sid_carries_the_fake_score(teacher_dir, tmp_path):
    first = tmp_path / "sid"
    distill(teacher_dir, "sid", max_steps=4, out=first, **FAST)
    a, b, record = start("sid", first)
    assert record["carried"] == ["student", "fake_score"]
    for k, v in weights(a.fake_score).items():
        assert torch.equal(b.fake_score.state_dict()[k], v), k
    assert not all(torch.equal(v, b.teacher.state_dict()[k]) for k, v in weights(a.fake_score).items())  # trained


def test_cd_to_ladd_keeps_the_consistency_student_and_resumes_and_reloads(teacher_dir, cd_run, tmp_path):
    out = tmp_path / "cd-ladd"
    distill(teacher_dir, "ladd", max_steps=2, out=out, init=str(cd_run), times=(1.0, 0.5), data=tiny_data(), **FAST)
    record = json.loads((out / "config.json").read_text())["init"]
    assert record["layout"] == ["consistency"] and record["one_step_gap"] == 0.0  # both start at sigma_max
    m = distill(teacher_dir, "ladd", max_steps=4, out=out, resume=True, **FAST)
    assert isinstance(m.student, ConsistencyStudent) and load_run(out).run.step == 4
    z = torch.randn(3, 2)
    assert isinstance(load_run(out).student, ConsistencyStudent)
    assert load_run(out).sample(z, 1, torch.tensor([0, 1, 0])).shape == (3, 2)


def test_consistency_student_into_a_one_step_generator_is_exact(cd_run):
    before, m, record = start("kd", cd_run, num_pairs=16, solver_steps=2)
    assert isinstance(m.student, OneStepGenerator) and isinstance(m.student.net, ConsistencyStudent)
    assert record["layout"] == ["generator:80.0", "consistency"]
    assert one_step_gap(before, m) < 1e-6


def test_minute_mark_checkpoints_survive_pruning(teacher_dir, tmp_path):
    out = tmp_path / "snap"
    distill(teacher_dir, "cd", max_steps=400, out=out, data=tiny_data(), snapshot_minutes=(0.0,), keep_checkpoints=1,
            **{**FAST, "checkpoint_every": 50})  # fmt: skip
    snaps = runck.snapshots(out / "checkpoints")
    assert [s.meta["snapshot_minutes"] for s in snaps] == [0.0] and snaps[0].step == 1
    kept = runck.checkpoint_dirs(out / "checkpoints")
    assert [d.name for d in kept] == ["step-00000400", "step-00000001"]  # the newest one plus the snapshot
    m = load_run(out, checkpoint=snaps[0].path.name)
    assert m.run.step == 1


def test_cli_init_error_is_one_line(teacher_dir, kd_run, tmp_path, capsys):
    from fewstep.cli import main

    rc = main(["distill", "--teacher", teacher_dir, "--method", "tract", "--init", str(kd_run), "--out",
               str(tmp_path / "x"), "--max-steps", "1", "--set", "cpu=true"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert rc != 0 and "cannot start from a run" in err and len(err.splitlines()) == 1
