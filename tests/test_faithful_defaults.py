"""Engine defaults that follow each method's reference code: the evaluation EMA (EDM's ramp-up for
every new run; DMD2 scores raw weights, SiD and Diff-Instruct a 500 kimg half-life EMA), kept
as they were for runs made before; `fewstep eval --weights raw|ema`."""

from __future__ import annotations

import json

import pytest

from fewstep.cli import main


def dry_run(capsys, method, *extra):
    assert main(["distill", "--teacher", "builtin:digits", "--method", method, "--out", "unused", "--dry-run",
                 *extra]) == 0  # fmt: skip
    return json.loads(capsys.readouterr().out)["train"]


@pytest.mark.parametrize(
    "method, decay, halflife",
    [("cd", 0.999, None), ("dmd2", 0.0, None), ("sid", 0.999, 500.0), ("diff_instruct", 0.999, 500.0)],
)
def test_new_runs_take_their_references_evaluation_ema(capsys, method, decay, halflife):
    train = dry_run(capsys, method)
    assert (train["ema_decay"], train["ema_halflife_kimg"], train["ema_rampup"]) == (decay, halflife, 0.05)


def test_a_users_ema_option_wins_over_the_methods(capsys):
    train = dry_run(capsys, "sid", "--set", "ema_decay=0.99")
    assert train["ema_decay"] == 0.99 and train["ema_halflife_kimg"] is None
    train = dry_run(capsys, "cd", "--set", "ema_rampup=none")
    assert train["ema_rampup"] is None


def test_raw_weights_when_the_reference_keeps_no_ema():
    from fewstep.train.config import TrainConfig

    assert all(TrainConfig(ema_decay=0.0, ema_rampup=0.05).eval_ema_decay(k) == 0.0 for k in (0, 10, 10**5))
    # a fixed decay under the ramp-up: EDM's half-life cap, reaching the fixed decay only late
    cfg = TrainConfig(ema_decay=0.999, ema_rampup=0.05, batch=64)
    assert cfg.eval_ema_decay(0) == pytest.approx(0.5**20)
    assert cfg.eval_ema_decay(10**6) == pytest.approx(0.999)


def test_runs_made_before_keep_their_ema_on_resume(tmp_path, capsys):
    from fewstep.train.api import plan_run
    from fewstep.train.config import Sources

    out = tmp_path / "old"
    assert main(["distill", "--teacher", "builtin:moons", "--method", "denoise", "--out", str(out),
                 "--data", "moons:500", "--max-steps", "2", "--batch", "8", "--set", "sample_n=0"]) == 0  # fmt: skip
    cfg = json.loads((out / "config.json").read_text())
    for key in ("ema_rampup", "ema_halflife_kimg"):  # as a run written before these options existed
        del cfg["train"][key]
    (out / "config.json").write_text(json.dumps(cfg))
    plan = plan_run(Sources(flags={"max_steps": 4}), out, resume=True)
    assert plan.cfg.ema_rampup is None and plan.cfg.ema_decay == 0.999


def test_eval_says_which_weights_it_scored(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert main(["distill", "--teacher", "builtin:moons", "--method", "denoise", "--out", str(out),
                 "--max-steps", "3", "--batch", "8", "--set", "sample_n=0"]) == 0  # fmt: skip
    quick = ["--n", "500", "--seeds", "1", "--baselines", "euler", "--baseline-nfe", "1", "--fidelity-n", "10"]
    assert main(["eval", str(out), "--steps", "1", *quick]) == 0
    ema = json.loads((out / "results.json").read_text())
    assert ema["weights"].startswith("the evaluation EMA (decay 0.999, ramp-up 0.05")
    assert main(["eval", str(out), "--steps", "1", "--weights", "raw", "--out", str(tmp_path / "raw"), *quick]) == 0
    raw = json.loads((tmp_path / "raw" / "results.json").read_text())
    assert raw["weights"].startswith("the raw trained weights")
    assert "student weights scored: the raw trained weights" in (tmp_path / "raw" / "report.md").read_text()
    assert raw["students"][0]["fid"] != ema["students"][0]["fid"]
