"""`fewstep eval` end to end on a tiny run of the analytic teacher: report, pictures, cache, errors."""

import json

import pytest

from fewstep.cli import main

QUICK = ["--n", "500", "--seeds", "1", "--baseline-nfe", "1,2", "--fidelity-n", "50"]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A tiny random 2-D MLP teacher that says it learned moons (the reference data)."""
    import torch

    from fewstep.teachers.native import build_model, save_model

    torch.manual_seed(0)
    t = build_model("mlp", {"dim": 2, "hidden": 32, "depth": 1, "num_classes": 2},
                    {"sample_shape": [2], "num_classes": 2})  # fmt: skip
    with torch.no_grad():
        t.net.out.weight.normal_(0, 0.1)
    return save_model(t, tmp_path_factory.mktemp("teacher") / "t", {"trained_on": "moons:2000"})


@pytest.fixture(scope="module")
def run_dir(teacher_dir, tmp_path_factory):
    from fewstep.train import distill

    out = tmp_path_factory.mktemp("eval") / "run"
    distill(str(teacher_dir), "denoise", max_steps=4, out=out, batch=8, sample_n=0, log_every=2, cpu=True)
    return out


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))


def one_line_error(capsys, match: str) -> None:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and match in err, err


def test_eval_of_a_run_writes_the_report(run_dir, capsys):
    assert main(["eval", str(run_dir), "--steps", "1,2", *QUICK]) == 0
    printed = capsys.readouterr().out
    assert "FID ratio at 1 NFE" in printed and f"report: {run_dir / 'report.md'}" in printed
    res = json.loads((run_dir / "results.json").read_text())
    assert [r["nfe"] for r in res["students"]] == [1, 2]  # counted student evaluations
    t = res["teacher_row"]
    assert (t["name"], t["nfe"]) == ("heun", 35) and t["fid"] > 0
    # baselines: 3 solvers at NFE 1 and 2 (Heun's 2 becomes 1 step = 1 NFE, a duplicate, dropped)
    assert sorted((r["name"], r["nfe"]) for r in res["baselines"]) == [
        ("dpmpp_2m", 1), ("dpmpp_2m", 2), ("euler", 1), ("euler", 2), ("heun", 1)]  # fmt: skip
    by = {(r["name"], r["nfe"]): r for r in res["baselines"]}
    # one step of Heun or DPM-Solver++ is an Euler step, and DPM-Solver++'s 2 steps are Euler's: same rows
    assert by[("heun", 1)]["fid"] == by[("dpmpp_2m", 1)]["fid"] == by[("euler", 1)]["fid"]
    assert by[("dpmpp_2m", 2)]["fid"] == by[("euler", 2)]["fid"]
    for r in res["students"]:
        assert r["fidelity"] > 0 and 0 <= r["precision"] <= 1 and r["swd"] > 0
    assert res["cost"]["steps"] == 4 and res["cost"]["minutes"] is not None
    kinds = {(s["kind"], s["nfe"]) for s in res["speed"]}
    assert kinds == {("student", 1), ("student", 2), ("teacher", 35)}
    report = (run_dir / "report.md").read_text()
    for part in ("## Quality", "## Baselines", "## Speed", "quality_vs_nfe.png", "samples.png", "FID ratio"):
        assert part in report
    ratio = res["students"][0]["fid"] / t["fid"]
    assert "| denoise | 1 | " in report and f"{ratio:.2f}" in report
    for png in ("quality_vs_nfe.png", "samples.png"):
        assert (run_dir / png).read_bytes()[:4] == b"\x89PNG"


def test_teacher_rows_are_cached_and_identical(teacher_dir, tmp_path, capsys):
    args = ["eval", str(teacher_dir), "--out", str(tmp_path / "a"), "--baselines", "euler", *QUICK]
    assert main(args) == 0
    first = json.loads((tmp_path / "a" / "results.json").read_text())
    assert main([*args[:3], str(tmp_path / "b"), *args[4:]]) == 0
    second = json.loads((tmp_path / "b" / "results.json").read_text())
    assert second["teacher_row"]["cached"] and not first["teacher_row"]["cached"]
    assert second["teacher_row"]["fid"] == first["teacher_row"]["fid"]
    # and recomputing gives the same numbers (generation is deterministic given the seeds)
    assert main([*args[:3], str(tmp_path / "c"), *args[4:], "--no-cache"]) == 0
    third = json.loads((tmp_path / "c" / "results.json").read_text())
    assert third["teacher_row"]["fid"] == pytest.approx(first["teacher_row"]["fid"], rel=1e-9)
    assert "ᶜ" in (tmp_path / "b" / "report.md").read_text()


def test_eval_of_the_analytic_teacher_reports_exact_metrics(tmp_path):
    assert main(["eval", "analytic:gaussians8", "--out", str(tmp_path), "--baselines", "euler", *QUICK]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    t = res["teacher_row"]
    assert t["extra"]["modes"] == 8 and t["extra"]["modes_covered"] == 8 and t["extra"]["mass_tv"] < 0.1
    one = next(r for r in res["baselines"] if r["nfe"] == 1)
    # one Euler step from sigma_max lands near the posterior mean of the whole ring: no recall
    assert one["recall"] < 0.05 < t["recall"]
    assert "mode-mass TV" in (tmp_path / "report.md").read_text()


def test_eval_refuses_bad_input(run_dir, tmp_path, capsys):
    assert main(["eval", str(run_dir), "--n", "100"]) == 2
    one_line_error(capsys, "too few samples for a stable FID")
    assert main(["eval", "analytic:gaussians8", *QUICK]) == 2
    one_line_error(capsys, "--out")
    assert main(["eval", "analytic:gaussians8", "--out", str(tmp_path), "--features", "digits", *QUICK]) == 2
    one_line_error(capsys, "takes samples of shape 1x8x8")
    wrapped = tmp_path / "run" / "student"  # a wrapper student (consistency, flow map) needs its run
    wrapped.mkdir(parents=True)
    (wrapped / "config.json").write_text(json.dumps({"format": "fewstep-student", "wrapper": "ConsistencyStudent"}))
    assert main(["eval", str(wrapped), *QUICK]) == 2
    one_line_error(capsys, "evaluate the run directory")


def test_eval_refuses_a_run_without_a_student(run_dir, tmp_path, capsys):
    import shutil

    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(run_dir / "config.json", empty / "config.json")
    shutil.copytree(run_dir / "teacher", empty / "teacher")  # the run's copy of its teacher
    assert main(["eval", str(empty), *QUICK]) == 2
    one_line_error(capsys, "no usable checkpoint")


def test_bench_writes_a_leaderboard(teacher_dir, tmp_path, capsys):
    import csv

    out = tmp_path / "bench"
    args = ["bench", "--teacher", str(teacher_dir), "--methods", "denoise,cd", "--max-steps", "3", "--batch", "8",
            "--out", str(out), "--baselines", "euler", "--set", "cd.lr=1e-3", "--set", "cd.batch=4",
            *QUICK]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "leaderboard:" in printed
    rows = list(csv.DictReader((out / "leaderboard.csv").open()))
    assert {r["method"] for r in rows} == {"denoise", "cd"}
    ratios = [float(r["ratio@1"]) for r in rows]
    assert ratios == sorted(ratios) and all(r > 0 for r in ratios)
    assert all(int(r["steps"]) == 3 for r in rows)
    md = (out / "leaderboard.md").read_text()
    assert "| 1 |" in md and "| 2 |" in md and "Baselines" in md
    assert (out / "quality_vs_nfe.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "quality_vs_nfe_all.png").read_bytes()[:4] == b"\x89PNG"  # every run; the first: best per method
    for m in ("denoise", "cd"):
        assert (out / "runs" / m / "report.md").is_file()
    cd_config = json.loads((out / "runs" / "cd" / "config.json").read_text())
    assert cd_config["method"]["options"]["lr"] == 1e-3 and cd_config["train"]["batch"] == 4  # per-method options
    assert json.loads((out / "runs" / "denoise" / "config.json").read_text())["train"]["batch"] == 8

    # the same runs ranked from their folders (no training): the same rows
    again = tmp_path / "again"
    runs = f"{out / 'runs' / 'cd'},{out / 'runs' / 'denoise'}"
    assert main(["bench", "--runs", runs, "--out", str(again), "--baselines", "euler", *QUICK]) == 0
    assert list(csv.DictReader((again / "leaderboard.csv").open())) == rows
    assert (again / "quality_vs_nfe.png").is_file()

    # a leaderboard folder grows: its rows plus a run; a re-run replaces the folder's row of its name
    grown = tmp_path / "grown"
    assert main(["bench", "--runs", f"{again},{out / 'runs' / 'cd'}", "--out", str(grown), *QUICK]) == 0
    assert sorted(r["method"] for r in csv.DictReader((grown / "leaderboard.csv").open())) == ["cd", "denoise"]
    assert main(["bench", "--runs", f"{again},{out}", "--out", str(tmp_path / "twice"), *QUICK]) == 2
    one_line_error(capsys, "two runs are named")


def test_bench_refuses_bad_options_and_mixed_runs(teacher_dir, tmp_path, capsys):
    base = ["bench", "--teacher", str(teacher_dir), "--methods", "denoise", "--max-steps", "1", "--out",
            str(tmp_path / "b"), *QUICK]  # fmt: skip
    assert main([*base, "--set", "cd.lr=1e-3"]) == 2
    one_line_error(capsys, "not in --methods")
    assert main([*base, "--set", "lr=1e-3"]) == 2
    one_line_error(capsys, "METHOD.KEY=VALUE")
    assert main(["bench", "--runs", str(tmp_path / "b"), "--minutes", "1", *QUICK]) == 2
    one_line_error(capsys, "ranks finished runs")
    assert not (tmp_path / "b").exists()


def test_bench_refuses_unknown_methods_before_training(teacher_dir, tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "--teacher", str(teacher_dir), "--methods", "denoise,nope", "--max-steps", "3",
                 "--out", str(out), *QUICK]) == 2  # fmt: skip
    one_line_error(capsys, "unknown method 'nope'")
    assert not (out / "runs").exists()
    assert main(["bench", "--teacher", str(teacher_dir), "--methods", "denoise", *QUICK]) == 2
    one_line_error(capsys, "same budget")


def test_demo_runs_end_to_end(teacher_dir, tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--teacher", str(teacher_dir), "--method", "denoise", "--minutes", "0.02", "--out", str(out),
                 "--baselines", "dpmpp_2m", *QUICK]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "FID ratio at 1 NFE" in printed and f"report: {out / 'report.md'}" in printed
    assert "## Speed" in (out / "report.md").read_text()


def test_training_hook_logs_fid_during_distillation(teacher_dir, tmp_path):
    from fewstep.eval import training_hook
    from fewstep.runs.folder import read_metrics
    from fewstep.train import distill

    out = tmp_path / "run"
    m = distill(str(teacher_dir), "denoise", max_steps=4, out=out, batch=8, sample_n=0, log_every=2, cpu=True,
                eval_every=2, eval_hook=training_hook)  # fmt: skip
    evals = [r for r in read_metrics(out) if "eval/fid@1" in r]
    assert [r["step"] for r in evals] == [2, 4]  # every 2 iterations; the final one is step 4
    assert all(r["eval/fid@1"] > 0 and 0 <= r["eval/precision@1"] <= 1 for r in evals)
    assert m.run.summary["step"] == 4


def test_leaderboard_plot_keeps_the_best_run_per_method(tmp_path, monkeypatch):
    from fewstep.eval import report
    from fewstep.eval.evaluate import Row

    drawn = []
    monkeypatch.setattr(report, "_save", lambda fig, path: drawn.append([l.get_label() for l in fig.axes[0].lines]))
    rows = lambda fid: [Row("x", "student", 1, fid=fid), Row("x", "student", 2, fid=fid / 2)]
    runs = {"cd_a": ("cd", "trajectory", rows(3.0)), "cd_b": ("cd", "trajectory", rows(2.0)),
            "kd": ("kd", "output", rows(4.0))}  # fmt: skip
    base = {"euler": [Row("euler", "teacher", 1, fid=50.0), Row("euler", "teacher", 8, fid=5.0)],
            "heun": [Row("heun", "teacher", 1, fid=50.0), Row("heun", "teacher", 8, fid=3.0)]}  # fmt: skip
    teacher = Row("heun", "teacher", 35, fid=1.0)
    report.leaderboard_plot(runs, base, teacher, tmp_path / "a.png")
    report.leaderboard_plot(runs, base, teacher, tmp_path / "b.png", best_only=False)
    best, every = drawn
    assert [l for l in best if l.startswith("cd")] == ["cd_b (trajectory)"] and "kd (output)" in best
    assert {"cd_a (trajectory)", "cd_b (trajectory)"} <= set(every)
    assert any(l.startswith("best training-free: Heun") for l in best)  # lowest FID at the largest NFE


def test_bench_curves_scores_minute_marks_and_a_chain_starts_where_its_first_stage_ended(teacher_dir, tmp_path, capsys):
    from fewstep.train import distill

    first, second = tmp_path / "kd", tmp_path / "kd-kd"
    distill(str(teacher_dir), "kd", max_steps=6, out=first, batch=8, sample_n=0, cpu=True, num_pairs=64,
            solver_steps=2, snapshot_minutes=(0.0,))  # fmt: skip
    distill(str(teacher_dir), "kd", max_steps=3, out=second, batch=8, sample_n=0, cpu=True, num_pairs=64,
            solver_steps=2, init=str(first))  # fmt: skip
    out = tmp_path / "curves"
    assert main(["bench", "--curves", f"{first},{second}", "--out", str(out), *QUICK]) == 0
    res = json.loads((out / "curves.json").read_text())["curves"]
    steps = [sorted({(p["step"], p["weights"]) for p in c["points"]}) for c in res]
    assert steps[0] == [(1, "ema"), (1, "raw"), (6, "ema"), (6, "raw")]  # the 0-minute mark and the end
    assert steps[1] == [(3, "ema"), (3, "raw")] and res[1]["label"] == "kd→kd"
    end_of_first = max(p["minutes"] for p in res[0]["points"])
    assert res[1]["chain_start"] == pytest.approx(end_of_first, abs=2e-3)
    assert min(p["minutes"] for p in res[1]["points"]) >= res[1]["chain_start"]
    assert all(p["ratio"] == pytest.approx(p["fid"] / res[0]["teacher_fid"]) for p in res[0]["points"])
    assert (out / "curves.png").stat().st_size > 0 and "| kd-kd | kd→kd |" in (out / "curves.md").read_text()
