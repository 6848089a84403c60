"""A user's own image folder end to end from the command line (issue: own data): teacher train,
distill, eval, sample and resume on a class folder, from another directory than the runs'; each
failure a new user met has a test here."""

from __future__ import annotations

import json
import math
import os
import time

import numpy as np
import pytest
import torch
from PIL import Image

import fewstep
from fewstep.cli import main
from fewstep.data import load_dataset
from fewstep.train.config import TrainConfig

TINY_NET = json.dumps({"channels": 8, "channel_mult": [1, 2], "blocks": 1, "attn_resolutions": [], "dropout": 0.1})


def class_folder(root, n=600, size=12):
    """Grey ``size``x``size`` images in two class sub-folders: class 0 bright on the left, 1 on the right."""
    rng = np.random.default_rng(0)
    for i in range(n):
        a = rng.integers(0, 40, (size, size)).astype(np.uint8)
        cls = i % 2
        a[:, : size // 2] += 200 if cls == 0 else 0
        a[:, size // 2 :] += 200 if cls == 1 else 0
        path = root / f"class{cls}" / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(a, "L").save(path)
    return root


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A user's working directory holding ``imgs/`` (the data) and ``runs/``; cache in tmp."""
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    (tmp_path / "work").mkdir()
    class_folder(tmp_path / "work" / "imgs")
    monkeypatch.chdir(tmp_path / "work")
    return tmp_path / "work"


def config(path):
    return json.loads((path / "config.json").read_text())


def test_folder_teacher_distill_eval_sample_resume_from_the_cli(work, tmp_path, monkeypatch, capsys):
    # teacher: the data's resolution and channels are read from the images and recorded whole
    assert main(["teacher", "train", "--data", "imgs", "--out", "runs/teacher", "--steps", "4", "--batch", "8",
                 "--net", TINY_NET, "--checkpoint-every", "2"]) == 0  # fmt: skip
    spec = config(work / "runs" / "teacher" / "student")["info"]["data"]
    assert spec == {"kind": "folder", "split": "train", "path": str(work / "imgs"), "resolution": 12,
                    "channels": 1, "convert": False}  # fmt: skip
    assert sorted(p.name for p in (work / "runs/teacher/samples").iterdir())[0] == "step-00000002-35step.png"

    # distill from the teacher run by a relative path: no --data, no --resolution needed
    fast = ["--max-steps", "3", "--batch", "8", "--set", "sample_n=0", "--set", "checkpoint_every=3"]
    assert main(["distill", "--teacher", "runs/teacher", "--method", "cd", "--out", "runs/cd", *fast]) == 0
    run = config(work / "runs" / "cd")
    assert run["teacher"]["saved"] and run["teacher"]["spec"] == str(work / "runs" / "teacher")
    assert run["data"]["spec"]["path"] == str(work / "imgs")

    # everything after this works from another directory, by absolute path
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cd = str(work / "runs" / "cd")
    assert main(["sample", "--model", cd, "--steps", "1", "-n", "8", "--out", "cd.png"]) == 0
    assert main(["distill", "--out", cd, "--resume", "--max-steps", "4"]) == 0  # distill --resume
    assert main(["teacher", "train", "--out", str(work / "runs/teacher"), "--resume", "--steps", "6"]) == 0
    assert config(work / "runs/teacher/student")["info"]["step"] == 6

    # a feature space for the folder, trained on its training split; shapes checked before sampling
    t0 = time.monotonic()
    assert main(["eval", cd, "--features", "digits", "--n", "500", "--seeds", "1"]) == 2
    assert "takes samples of shape 1x8x8, got 1x12x12" in capsys.readouterr().err
    assert time.monotonic() - t0 < 10  # refused before any teacher sampling
    args = ["--n", "500", "--seeds", "1", "--baselines", "euler", "--baseline-nfe", "1,2", "--fidelity-n", "20"]
    assert main(["eval", cd, *args]) == 0
    results = json.loads((work / "runs/cd/results.json").read_text())
    protocol = results["protocol"]
    assert protocol["features"].startswith("data-cnn-") and protocol["classifier_test_split"].endswith("imgs:test")
    assert protocol["classifier_test_accuracy"] > 0.9  # the two classes are easy to tell apart
    assert results["floor"]["data"] == f"{work / 'imgs'}:test" and results["floor"]["n"] > 0
    assert [r["nfe"] for r in results["students"]] == [1, 2, 4]
    report = (work / "runs/cd/report.md").read_text()
    assert "held-out accuracy of the feature network" in report and "imgs:test" in report
    assert (work / "runs/cd/samples.png").is_file()
    # the classifier is cached by the data's digest: a second evaluation reuses it
    assert len(list((tmp_path / "cache" / "classifiers").iterdir())) == 1
    capsys.readouterr()
    assert main(["eval", cd, *args]) == 0
    again = capsys.readouterr().out
    assert "training a feature classifier" not in again
    assert "teacher heun @ 35 NFE: row reused from the cache" in again  # said, not silent


def test_api_dataset_is_kept_in_the_run_for_resume(work, tmp_path):
    """``fewstep.distill(..., data=Dataset)`` once recorded ``"data": null``: the run now keeps the
    data (a data set built in Python) or its spec (one loaded from a spec), so the CLI can resume."""
    from fewstep.teachers.train import new_model

    data = load_dataset("imgs")
    built = fewstep.Dataset(data.x, data.labels, data.num_classes, "mine")  # made in Python: no spec
    teacher = new_model(data.sample_shape, data.num_classes, net=json.loads(TINY_NET))
    out = tmp_path / "api-run"
    fewstep.distill(teacher, "denoise", 2, out, data=built, batch=8, sample_n=0, cpu=True)
    assert config(out)["data"]["saved"] and (out / "data.safetensors").is_file()
    assert main(["distill", "--out", str(out), "--resume", "--max-steps", "3"]) == 0
    spec_run = tmp_path / "spec-run"
    fewstep.distill(teacher, "denoise", 2, spec_run, data=data, batch=8, sample_n=0, cpu=True)
    assert config(spec_run)["data"]["spec"] == data.spec.to_dict()


def test_edm_ema_ramp_up_leaves_no_trace_of_the_initial_weights():
    """EDM's evaluation EMA: beta = 0.5 ** (batch / min(halflife, rampup * images seen))."""
    cfg = TrainConfig(batch=128, ema_halflife_kimg=500, ema_rampup=0.05, max_steps=1000)
    assert cfg.eval_ema_decay(0) == pytest.approx(0.5 ** (128 / (128 * 0.05)))
    assert cfg.eval_ema_decay(999) == pytest.approx(0.5 ** (128 / (1000 * 128 * 0.05)))
    late = TrainConfig(batch=128, ema_halflife_kimg=0.5, ema_rampup=0.05)
    assert late.eval_ema_decay(10**6) == pytest.approx(0.5 ** (128 / 500))  # the half-life caps it
    assert TrainConfig(ema_decay=0.99).eval_ema_decay(5) == 0.99  # a fixed decay without them
    # weight of the initial copy after 700 steps (a 20-minute teacher): none left
    left = math.prod(cfg.eval_ema_decay(k) for k in range(700))
    fixed = TrainConfig(batch=128, ema_halflife_kimg=100)  # the old default, no ramp-up
    assert left < 1e-12 < 0.3 < math.prod(fixed.eval_ema_decay(k) for k in range(700))


def test_progress_follows_the_minutes_budget():
    from fewstep.train.progress import Progress

    bar = Progress(TrainConfig(max_steps=None, minutes=2.0), 0, "x")
    assert bar.fraction(step=10, elapsed=60.0) == pytest.approx(0.5)
    both = Progress(TrainConfig(max_steps=100, minutes=2.0), 0, "x")
    assert both.fraction(step=80, elapsed=60.0) == pytest.approx(0.8)  # whichever ends first
    bar.close()
    both.close()


def test_teacher_presets_fit_the_data():
    from fewstep.teachers.train import new_model, preset

    assert preset((1, 28, 28))[2] == 128 and preset((1, 8, 8))[2] == 256
    m = new_model((1, 28, 28), 10)
    assert m.sample_shape == (1, 28, 28) and m.net.config.in_channels == 1
    assert 0.8e6 < sum(p.numel() for p in m.parameters()) < 1.3e6


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["teacher", "train", "--help"])
    out = capsys.readouterr().out
    assert "(default: 0.002)" in out and "(default: 500.0)" in out and "--convert" in out


@pytest.mark.parametrize("argv", [["--resolution", "16"], ["--channels", "3"]])
def test_cli_refuses_data_it_would_change_silently(work, capsys, argv):
    assert main(["teacher", "train", "--data", "imgs", "--out", "runs/t", "--steps", "1", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--convert" in err and not os.path.exists("runs/t")


def test_run_teacher_copy_makes_a_run_independent_of_the_teacher_folder(work, tmp_path, monkeypatch):
    from fewstep.teachers.native import save_model
    from fewstep.teachers.train import new_model

    data = load_dataset("imgs")
    folder = save_model(
        new_model(data.sample_shape, 2, net=json.loads(TINY_NET)), work / "t", {"data": data.spec.to_dict()}
    )
    assert main(["distill", "--teacher", "t", "--method", "kd", "--out", "runs/kd", "--max-steps", "1", "--batch", "4",
                 "--set", "sample_n=0", "--set", "num_pairs=8", "--set", "solver_steps=2"]) == 0  # fmt: skip
    for p in folder.iterdir():
        p.unlink()
    folder.rmdir()
    monkeypatch.chdir(tmp_path)
    method = fewstep.load_run(work / "runs" / "kd")
    assert method.sample(torch.randn(2, 1, 12, 12), 1, torch.tensor([0, 1])).shape == (2, 1, 12, 12)


def test_unlabelled_folder_gets_label_free_features(tmp_path, monkeypatch):
    """Without class sub-folders the feature network learns to tell the four rotations of an
    image apart (no labels needed); it is cached and reports its held-out accuracy."""
    from fewstep.data import parse_data
    from fewstep.eval.classifier import classifier_for
    from fewstep.eval.features import get_extractor

    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    (tmp_path / "plain").mkdir()
    for i in range(300):  # a bright bar along the top edge: its rotation is easy to see
        a = rng.integers(0, 30, (12, 12)).astype(np.uint8)
        a[: 2 + i % 3, 1 + i % 4 : 9] = 250
        Image.fromarray(a, "L").save(tmp_path / "plain" / f"{i:03d}.png")
    spec = parse_data(str(tmp_path / "plain"))
    folder = classifier_for(spec, progress=lambda m: None)
    record = json.loads((folder / "config.json").read_text())["record"]
    assert record["task"] == "rotation" and record["test_accuracy"] > 0.9  # chance is 0.25
    ex = get_extractor("auto", (1, 12, 12), data=spec)
    assert ex.name.startswith("data-cnn-") and not ex.predicts_labels
    assert ex.features(torch.zeros(3, 1, 12, 12)).shape == (3, ex.dim)
