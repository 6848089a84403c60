"""`fewstep distill`, typed options, the run directory, `fewstep.distill`, `load_run` and
`fewstep sample --model runs/x`."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

import fewstep
from engine_helpers import tiny_data, tiny_teacher
from fewstep.cli import main
from fewstep.errors import FewstepError
from fewstep.options import build, coerce
from fewstep.runs.folder import read_metrics
from fewstep.train.config import TrainConfig

FAST = ["--set", "sample_n=0", "--set", "log_every=2", "--set", "cpu=true"]


@pytest.fixture
def teacher_dir(tmp_path):
    from fewstep.teachers.native import save_model

    return str(save_model(tiny_teacher(), tmp_path / "teacher"))


def distill(teacher_dir, out, *extra):
    return main(["distill", "--teacher", teacher_dir, "--method", "denoise", "--out", str(out), "--data", "moons:500",
                 "--max-steps", "4", "--batch", "8", *FAST, *extra])  # fmt: skip


def one_line_error(capsys, match: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and match in err, err
    return err


# --- typed options ------------------------------------------------------------------------------
def test_options_are_converted_to_their_declared_types():
    from fewstep.methods.denoise import DenoiseConfig

    c = build(DenoiseConfig, {"lr": "1e-4", "betas": "0.8,0.95", "grad_clip": "none", "label_dropout": 0}, "m")
    assert c.lr == 1e-4 and c.betas == (0.8, 0.95) and c.grad_clip is None and c.label_dropout == 0.0
    assert build(DenoiseConfig, {"grad_clip": "2"}, "m").grad_clip == 2.0
    assert coerce("[1, 2, 3]", tuple[int, ...], "k") == (1, 2, 3)
    assert coerce("yes", bool, "k") is True and coerce("7", int, "k") == 7


@pytest.mark.parametrize(
    "options, match",
    [
        ({"lr": "fast"}, "option lr (m) must be float"),
        ({"lr": True}, "option lr (m) must be float"),
        ({"betas": "0.9"}, "needs 2 values"),
        ({"solver": 3}, "must be str"),
        ({"nope": 1}, "unknown option 'nope' for m; valid options: lr, betas"),
    ],
)
def test_wrong_options_are_one_line_errors(options, match):
    from fewstep.methods.denoise import DenoiseConfig

    with pytest.raises(FewstepError, match=re.escape(match)) as e:
        build(DenoiseConfig, options, "m")
    assert "\n" not in str(e.value)


def test_engine_options_are_validated():
    with pytest.raises(FewstepError, match="mixed_precision must be one of no, bf16, fp16"):
        build(TrainConfig, {"mixed_precision": "fp8"}, "engine").validate()
    with pytest.raises(FewstepError, match="give a budget"):
        TrainConfig(max_steps=None, minutes=None).validate()


# --- the command line ---------------------------------------------------------------------------
def test_distill_writes_a_complete_run_directory(tmp_path, teacher_dir, capsys):
    out = tmp_path / "run"
    assert distill(teacher_dir, out, "--set", "lr=2e-4", "--set", "ema_decay=0.9", "--set", "sample_n=16") == 0
    assert "denoise: 4 steps" in capsys.readouterr().out
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["format"] == "fewstep-run" and cfg["method"]["name"] == "denoise"
    assert cfg["method"]["options"]["lr"] == 2e-4 and cfg["train"]["ema_decay"] == 0.9
    assert cfg["teacher"]["spec"] == teacher_dir and cfg["data"]["name"] == "moons:500"
    assert [r["step"] for r in read_metrics(out)] == [2, 4]
    assert (out / "checkpoints" / "step-00000004" / "state.json").is_file()
    assert sorted(p.name for p in (out / "samples").iterdir()) == [f"step-00000004-{k}step.png" for k in (1, 2, 4)]
    assert (out / "student" / "model.safetensors").is_file()
    # the saved student (the evaluation EMA) is an ordinary model folder for a denoising student
    from fewstep.teachers import load_teacher

    student = load_teacher(out / "student")
    run = fewstep.load_run(out)
    for k, v in run.student.state_dict().items():
        assert torch.equal(v, student.state_dict()[k]), k


def test_config_file_flags_and_set_in_order_of_precedence(tmp_path, teacher_dir, capsys):
    file = tmp_path / "c.yaml"
    file.write_text("method: denoise\nbatch: 32\nseed: 3\nmax_steps: 9\noptions:\n  lr: 1.0e-3\n  p_std: 2.0\n")
    rc = main(["distill", "--config", str(file), "--teacher", teacher_dir, "--out", str(tmp_path / "r"),
               "--batch", "16", "--set", "lr=5e-4", "--set", "train.seed=4", "--dry-run"])  # fmt: skip
    assert rc == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["train"]["batch"] == 16 and cfg["train"]["seed"] == 4 and cfg["train"]["max_steps"] == 9
    assert cfg["method"]["options"]["lr"] == 5e-4 and cfg["method"]["options"]["p_std"] == 2.0
    assert not (tmp_path / "r").exists()  # --dry-run touches nothing


def test_minutes_alone_means_no_step_limit(tmp_path, teacher_dir, capsys):
    rc = main(["distill", "--teacher", teacher_dir, "--method", "denoise", "--out", str(tmp_path / "r"),
               "--minutes", "2", "--dry-run"])  # fmt: skip
    assert rc == 0
    cfg = json.loads(capsys.readouterr().out)["train"]
    assert cfg["max_steps"] is None and cfg["minutes"] == 2.0


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--method", "no-such-method"], "unknown method 'no-such-method'"),
        (["--set", "lr=abc"], "option lr (method denoise) must be float"),
        (["--set", "bogus=1"], "unknown option 'bogus' for method denoise"),
        (["--data", "digits"], "data digits:train has samples of shape [1, 8, 8] but the teacher makes [2]"),
        (["--batch", "0"], "batch must be >= 1"),
        (["--set", "mixed_precision=fp16"], "fp16 needs a GPU"),
    ],
)
def test_bad_input_is_a_one_line_error_and_writes_nothing(tmp_path, teacher_dir, capsys, extra, match):
    out = tmp_path / "run"
    assert distill(teacher_dir, out, *extra) == 2
    one_line_error(capsys, match)
    assert not out.exists()


def test_a_class_mismatch_between_teacher_and_data_is_refused(tmp_path, capsys):
    from fewstep.teachers.native import save_model

    t = save_model(tiny_teacher(num_classes=3), tmp_path / "t3")
    assert distill(str(t), tmp_path / "run") == 2
    one_line_error(capsys, "data moons:500 has 2 classes but the teacher has 3")


def test_an_existing_run_is_never_overwritten_silently(tmp_path, teacher_dir, capsys):
    out = tmp_path / "run"
    assert distill(teacher_dir, out) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert distill(teacher_dir, out) == 2
    one_line_error(capsys, "already exists; continue it with --resume, replace it with --overwrite")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert distill(teacher_dir, out, "--overwrite", "--set", "seed=1") == 0
    assert json.loads((out / "config.json").read_text())["train"]["seed"] == 1
    other = tmp_path / "not-a-run"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    assert distill(teacher_dir, other, "--overwrite") == 2
    one_line_error(capsys, "is not a fewstep run directory, so --overwrite will not delete it")
    assert (other / "precious.txt").read_text() == "keep me"
    assert distill(teacher_dir, out, "--resume", "--overwrite") == 2


def test_resume_from_the_command_line(tmp_path, teacher_dir, capsys):
    out = tmp_path / "run"
    assert distill(teacher_dir, out) == 0
    assert main(["distill", "--out", str(out), "--resume", "--max-steps", "6"]) == 0
    assert "denoise: 6 steps" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["train"]["max_steps"] == 6
    assert main(["distill", "--out", str(out), "--resume", "--max-steps", "8", "--batch", "16"]) == 2
    one_line_error(capsys, "was made with batch=8; --resume cannot change it to 16")
    assert main(["distill", "--out", str(out), "--resume", "--set", "lr=1"]) == 2
    one_line_error(capsys, "was made with lr=0.0001; --resume cannot change it")
    assert main(["distill", "--out", str(out), "--resume", "--method", "other"]) == 2
    one_line_error(capsys, "is a 'denoise' run; --resume cannot switch it")


def test_resume_needs_a_run_with_a_checkpoint(tmp_path, teacher_dir, capsys):
    assert main(["distill", "--out", str(tmp_path / "nothing"), "--resume"]) == 2
    one_line_error(capsys, "is not a fewstep run directory; start a new run without --resume")
    out = tmp_path / "run"
    assert distill(teacher_dir, out) == 0
    import shutil

    shutil.rmtree(out / "checkpoints")
    config = (out / "config.json").read_bytes()
    assert main(["distill", "--out", str(out), "--resume"]) == 2
    one_line_error(capsys, "has no usable checkpoint")
    assert (out / "config.json").read_bytes() == config


def test_sample_a_run_with_its_method_sampler_and_teachers_still_work(tmp_path, teacher_dir, capsys):
    out = tmp_path / "run"
    assert distill(teacher_dir, out) == 0
    npz = tmp_path / "s.npz"
    assert main(["sample", "--model", str(out), "--steps", "2", "-n", "6", "--out", str(npz)]) == 0
    assert "denoise student, 2 step(s)" in capsys.readouterr().out
    got = np.load(npz)
    assert got["samples"].shape == (6, 2) and list(got["seeds"]) == list(range(6))
    # the same samples as the loaded run's own sampler, from the same seeded noise
    from fewstep.seeding import seeded_labels, seeded_noise

    method = fewstep.load_run(out)
    expected = method.sample(seeded_noise(range(6), (2,)), 2, cond=seeded_labels(range(6), 2))
    np.testing.assert_allclose(got["samples"], expected.numpy(), rtol=0, atol=1e-6)
    assert main(["sample", "--model", str(out), "--steps", "1", "-n", "16", "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").is_file()
    assert main(["sample", "--model", str(out), "--solver", "heun", "--out", str(tmp_path / "x.png")]) == 2
    one_line_error(capsys, "--solver applies to teachers")
    assert main(["sample", "--model", str(out), "--guidance", "2", "--out", str(tmp_path / "x.png")]) == 2
    one_line_error(capsys, "--guidance: this denoise student has no guidance input")
    assert main(["sample", "--model", teacher_dir, "--steps", "3", "-n", "4", "--out", str(tmp_path / "t.npz")]) == 0
    assert "heun, 5 NFE" in capsys.readouterr().out


# --- the Python API -----------------------------------------------------------------------------
def test_python_api_trains_returns_the_method_and_loads_back(tmp_path):
    teacher = tiny_teacher()
    method = fewstep.distill(teacher, "denoise", max_steps=3, out=tmp_path / "run", data=tiny_data(), batch=8,
                             sample_n=0, cpu=True, lr=3e-4, ema_decay=0.5)  # fmt: skip
    assert method.config.lr == 3e-4 and method.run.summary["step"] == 3 and not method.student.training
    loaded = fewstep.load_run(tmp_path / "run")  # the teacher object was saved into the run
    assert loaded.run.step == 3
    for k, v in method.student.state_dict().items():
        assert torch.equal(v, loaded.student.state_dict()[k]), k
    raw = fewstep.load_run(tmp_path / "run", ema=False)
    assert not torch.equal(raw.student.net.out.weight, loaded.student.net.out.weight)
    first = fewstep.load_run(tmp_path / "run", checkpoint="step-00000003")
    assert first.run.step == 3
    with pytest.raises(FewstepError, match="needs data"):
        fewstep.distill(teacher, "denoise", max_steps=1, out=tmp_path / "nodata", cpu=True)
    assert not (tmp_path / "nodata").exists()


def test_analytic_teachers_supply_exact_data(tmp_path):
    from engine_helpers import Pair
    from fewstep.train.api import plan_run, resolve_data
    from fewstep.train.config import Sources

    plan = plan_run(Sources(file={"method": "denoise", "teacher": "analytic:gaussians8"}), tmp_path / "r")
    data = resolve_data(plan, Pair(plan.teacher))
    assert data.x.shape == (20000, 2) and data.num_classes == 8
    # every sample lies near the mean of its own labelled component (std 0.05)
    dist = (data.x - plan.teacher.means[data.labels]).norm(dim=1)
    assert float(dist.max()) < 0.4 and abs(float(dist.pow(2).mean()) - 2 * 0.05**2) < 2e-4
    # no network to copy: the student is the default MLP for 2-D samples (tests/test_students.py)
    m = fewstep.distill("analytic:gaussians8", "denoise", max_steps=1, out=tmp_path / "run", cpu=True)
    assert type(m.student.net).__name__ == "MLP" and m.student.net.config.dim == 2


@pytest.mark.parametrize(
    "env, match",
    [
        ({"ACCELERATE_USE_FSDP": "true"}, "configured for FSDP version 1"),  # accelerate's default version
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "set fsdp_version: 2"),
        ({"ACCELERATE_USE_DEEPSPEED": "true"}, "configured for DEEPSPEED"),
    ],
)
def test_fsdp1_and_deepspeed_configurations_are_refused_before_anything_is_written(
    tmp_path, teacher_dir, capsys, monkeypatch, env, match
):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert distill(teacher_dir, tmp_path / "run") == 2
    one_line_error(capsys, match)
    assert not (tmp_path / "run").exists()


def test_bad_optimizer_options_are_one_line_errors(teacher_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert distill(teacher_dir, out) == 0
    before = (out / "student" / "model.safetensors").read_bytes()
    assert distill(teacher_dir, out, "--overwrite", "--set", "lr=-1") == 2
    one_line_error(capsys, "lr must be > 0")
    assert (out / "student" / "model.safetensors").read_bytes() == before  # refused before the old run was touched


def test_damaged_checkpoints_are_named_as_damaged(teacher_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert distill(teacher_dir, out, "--set", "checkpoint_every=2") == 0
    for d in (out / "checkpoints").iterdir():
        (d / "weights.safetensors").write_bytes(b"garbage")
    capsys.readouterr()
    with pytest.warns(UserWarning):
        assert distill(teacher_dir, out, "--resume", "--max-steps", "6") == 2
    one_line_error(capsys, "all 2 are damaged (newest step-00000004: weights.safetensors does not match its checksum")


def test_a_run_folder_is_locked_while_a_process_trains_into_it(teacher_dir, tmp_path, capsys):
    from fewstep.runs.folder import LOCK, RunLock

    out = tmp_path / "run"
    held = RunLock(out)
    held.acquire()  # another process training into the folder
    assert distill(teacher_dir, out) == 2
    one_line_error(capsys, f"{out} is in use by another fewstep process (pid")
    held.release()  # that process ended: its lock file stays, unlocked (as after a SIGKILL)
    assert (out / LOCK).is_file()
    assert distill(teacher_dir, out) == 0
    assert distill(teacher_dir, out, "--resume", "--max-steps", "6") == 0


def test_two_processes_started_at_once_into_one_folder(teacher_dir, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fewstep", "distill", "--teacher", teacher_dir, "--method", "denoise", "--out",
           str(out), "--data", "moons:500", "--max-steps", "300", "--batch", "8", *FAST]  # fmt: skip
    procs = [subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    err = next(e for code, e in results if code == 2)
    assert "in use by another fewstep process" in err or "already exists" in err
