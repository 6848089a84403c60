"""The training loop's semantics: update ratios, no gradient leaks, frozen networks, EMAs,
gradient accumulation, non-finite guards, mixed precision, no host syncs, budgets."""

from __future__ import annotations

import json

import pytest
import torch

from engine_helpers import Pair, PairConfig, state_of, tiny_config, tiny_data, tiny_teacher
from fewstep.errors import FewstepError
from fewstep.io import load_tensors
from fewstep.runs import checkpoints as runck
from fewstep.runs.folder import read_metrics
from fewstep.train import loop
from fewstep.train.loop import train


def run_pair(tmp_path, cfg_kw=None, **pair_kw):
    method = Pair(tiny_teacher(), PairConfig(**pair_kw))
    summary = train(method, tiny_config(**(cfg_kw or {})), tmp_path, data=tiny_data())
    return method, summary


def test_update_ratios_are_honoured(tmp_path):
    method, summary = run_pair(tmp_path, {"max_steps": 10}, b_every=3, b_offset=1)
    assert summary["step"] == 10
    expected = [(i, frozenset({"a"} | ({"b"} if i % 3 == 1 else set()))) for i in range(10)]
    assert method.calls == expected
    opt = load_tensors(runck.latest(tmp_path / "checkpoints").path / "optim.safetensors")
    assert float(opt["opt.a.0.step"]) == 10  # a steps every iteration
    assert float(opt["opt.b.0.step"]) == 3  # b on iterations 1, 4, 7


def test_iterations_with_nothing_due_do_not_call_the_method(tmp_path):
    method, _ = run_pair(tmp_path, {"max_steps": 6}, a_every=2, b_every=2)  # both due on even steps only
    assert [i for i, _ in method.calls] == [0, 2, 4]


def test_gradients_do_not_leak_between_optimizers(tmp_path):
    # each loss has zero gradient w.r.t. its own network and a non-zero one w.r.t. the other:
    # if any gradient leaked into the other optimizer, that network would move.
    teacher = tiny_teacher()
    method = Pair(teacher, PairConfig(cross_only=True))
    a0, b0 = state_of(method.student), state_of(method.b)
    train(method, tiny_config(max_steps=5), tmp_path, data=tiny_data())
    for k in a0:
        assert torch.equal(method.student.state_dict()[k], a0[k]), k
        assert torch.equal(method.b.state_dict()[k], b0[k]), k
    # the same losses without the cross terms' isolation do move both networks
    moved = Pair(teacher, PairConfig())
    train(moved, tiny_config(max_steps=5), tmp_path / "moved", data=tiny_data())
    assert not torch.equal(moved.student.weight, a0["weight"]) and not torch.equal(moved.b.weight, b0["weight"])


def test_frozen_networks_get_no_gradient_and_no_optimizer_state(tmp_path):
    from fewstep.methods.denoise import Denoise

    teacher = tiny_teacher()
    before = state_of(teacher)
    method = Denoise(teacher)
    train(method, tiny_config(max_steps=6, grad_accum=2), tmp_path, data=tiny_data())
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    found = runck.latest(tmp_path / "checkpoints")
    opt = load_tensors(found.path / "optim.safetensors")
    n_student = len(list(method.student.parameters()))
    assert len([k for k in opt if k.startswith("opt.")]) == 3 * n_student  # step, exp_avg, exp_avg_sq each
    weights = load_tensors(found.path / "weights.safetensors")
    assert not any("teacher" in k for k in weights)
    assert not torch.equal(method.student.net.out.weight, teacher.net.out.weight)  # the student did train


def test_method_ema_follows_its_source_after_each_of_its_steps(tmp_path):
    d = 0.7
    method, _ = run_pair(tmp_path, {"max_steps": 7, "ema_decay": 0.9}, b_every=2, ema_decay=d)
    # b's weight after each of its steps: its value at the next call of losses (or the final value)
    history = method.b_history + [method.b.weight.detach()]
    ema = history[0].clone()  # the EMA starts as a copy of b
    for i in range(7):
        if i % 2 == 0:  # b stepped at iteration i: its new value is seen at call i + 1
            ema = ema.lerp(history[i + 1], 1 - d)
    torch.testing.assert_close(method.b_ema.weight, ema, rtol=0, atol=1e-6)


def test_evaluation_ema_uses_the_configured_decay(tmp_path):
    teacher = tiny_teacher()
    method = Pair(teacher, PairConfig(a_every=1))
    snapshots = []
    inner = method.losses

    def recording(batch, step, due):
        snapshots.append(method.student.weight.detach().clone())
        return inner(batch, step, due)

    method.losses = recording
    decay = 0.8
    train(method, tiny_config(max_steps=4, ema_decay=decay), tmp_path, data=tiny_data())
    snapshots.append(method.student.weight.detach().clone())
    ema = snapshots[0].clone()
    for w in snapshots[1:]:
        ema = ema.lerp(w, 1 - decay)
    found = runck.latest(tmp_path / "checkpoints")
    saved = load_tensors(found.path / "weights.safetensors")["eval_ema.weight"]
    torch.testing.assert_close(saved, ema, rtol=0, atol=1e-6)


def test_gradient_accumulation_matches_the_full_batch(tmp_path):
    full, _ = run_pair(tmp_path / "full", {"max_steps": 4, "batch": 16})
    accum, _ = run_pair(tmp_path / "accum", {"max_steps": 4, "batch": 16, "grad_accum": 4})
    for x, y in zip(full.networks().values(), accum.networks().values(), strict=True):
        for p, q in zip(x.parameters(), y.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_gradient_clipping_bounds_the_norm(tmp_path):
    method, _ = run_pair(tmp_path, {"max_steps": 5, "log_every": 5}, grad_clip=1e-3, lr=1.0, kind="adamw")
    record = [r for r in read_metrics(tmp_path) if "grad_norm/a" in r][0]
    assert record["grad_norm/a"] > 1e-3  # the pre-clipping norm is what is logged


@pytest.mark.parametrize("kind", ["adam", "radam"])
def test_a_non_finite_iteration_is_skipped_and_counted(tmp_path, kind):
    method = Pair(tiny_teacher(), PairConfig(nan_steps=(2, 3), kind=kind))
    snap = {}
    inner = method.losses

    def recording(batch, step, due):
        snap[step] = (state_of(method.student), state_of(method.b), state_of(method.b_ema))
        return inner(batch, step, due)

    method.losses = recording
    summary = train(method, tiny_config(max_steps=6, log_every=1), tmp_path, data=tiny_data())
    assert summary["nonfinite"] == 2
    for before, after in zip(snap[2], snap[4], strict=True):  # iterations 2 and 3 changed nothing
        for k in before:
            assert torch.equal(before[k], after[k]), k
    assert not torch.equal(snap[4][0]["weight"], snap[5][0]["weight"])  # and training went on
    records = read_metrics(tmp_path)
    assert [r["nonfinite"] for r in records] == [0, 0, 1, 2, 2, 2]
    assert all(torch.isfinite(p).all() for p in method.student.parameters())
    opt = load_tensors(runck.latest(tmp_path / "checkpoints").path / "optim.safetensors")
    assert float(opt["opt.a.0.step"]) == 4


def test_many_non_finite_in_a_row_stop_the_run_and_keep_the_last_checkpoint(tmp_path):
    method = Pair(tiny_teacher(), PairConfig(nan_steps=tuple(range(5, 100))))
    cfg = tiny_config(max_steps=50, log_every=2, checkpoint_every=4, max_nonfinite=3)
    with pytest.raises(FewstepError, match="non-finite losses in a row") as e:
        train(method, cfg, tmp_path, data=tiny_data())
    assert "\n" not in str(e.value)
    found = runck.latest(tmp_path / "checkpoints")
    assert found is not None and found.step == 4  # the streak was detected at step 8, before saving
    weights = load_tensors(found.path / "weights.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values())


def recording_dtypes(method, seen):
    """Record the dtype a linear layer of the student computes in, inside ``losses``."""
    inner = method.losses

    def losses(batch, step, due):
        seen.append(method.student.net.inp(batch.x).dtype)
        return inner(batch, step, due)

    method.losses = losses
    return method


def test_mixed_precision_is_opt_in_and_keeps_float32_weights(tmp_path):
    from fewstep.methods.denoise import Denoise

    seen = []
    method = recording_dtypes(Denoise(tiny_teacher()), seen)
    train(method, tiny_config(max_steps=2, mixed_precision="bf16"), tmp_path / "bf16", data=tiny_data())
    assert seen == [torch.bfloat16, torch.bfloat16]
    assert all(p.dtype == torch.float32 for p in method.student.parameters())
    method = recording_dtypes(Denoise(tiny_teacher()), seen)
    train(method, tiny_config(max_steps=1), tmp_path / "fp32", data=tiny_data())
    assert seen[-1] == torch.float32


def test_no_host_synchronisation_inside_iterations(tmp_path, monkeypatch):
    from fewstep.methods.denoise import Denoise

    calls = []
    active = [False]
    for name in ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)

        def spy(self, *a, _name=name, _orig=original, **k):
            if active[0]:
                calls.append(_name)
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, spy)
    real = loop.iteration

    def watched(*args, **kwargs):
        active[0] = True
        try:
            return real(*args, **kwargs)
        finally:
            active[0] = False

    monkeypatch.setattr(loop, "iteration", watched)
    method = Denoise(tiny_teacher(), Denoise.Config(grad_clip=1.0))
    train(method, tiny_config(max_steps=8, log_every=4), tmp_path, data=tiny_data())
    assert calls == []
    # the spy does see a synchronisation where one happens (RAdam's non-finite check)
    pair = Pair(tiny_teacher(), PairConfig(kind="radam"))
    train(pair, tiny_config(max_steps=1), tmp_path / "radam", data=tiny_data())
    assert "__bool__" in calls


def test_minutes_budget_stops_the_run(tmp_path):
    method, summary = run_pair(tmp_path, {"max_steps": None, "minutes": 0.5 / 60, "checkpoint_every": 10**6})
    assert summary["stopped_by"] == "minutes" and summary["step"] >= 1
    assert runck.latest(tmp_path / "checkpoints").step == summary["step"]  # a final checkpoint is written


def test_metrics_and_sample_grids_are_written(tmp_path):
    from fewstep.methods.denoise import Denoise

    method = Denoise(tiny_teacher())
    train(method, tiny_config(max_steps=6, log_every=3, sample_every=3, sample_n=16), tmp_path, data=tiny_data())
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [3, 6]
    assert all({"loss/student", "it_per_s", "nonfinite"} <= r.keys() for r in records)
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["step"] == 3
    names = sorted(p.name for p in (tmp_path / "samples").iterdir())
    assert names == [f"step-{s:08d}-{k}step.png" for s in (3, 6) for k in (1, 2, 4)]


def test_sampling_and_evaluation_do_not_change_the_trajectory(tmp_path):
    from fewstep.methods.denoise import Denoise

    seen = []

    def hook(method, step, run_dir):
        seen.append((step, method.student.training))
        torch.randn(100)  # consumes RNG inside the hook
        return {"score": float(step)}

    a = Denoise(tiny_teacher())
    train(a, tiny_config(max_steps=6, sample_every=2, sample_n=8, eval_every=3), tmp_path / "a", data=tiny_data(),
          eval_hook=hook)  # fmt: skip
    b = Denoise(tiny_teacher())
    train(b, tiny_config(max_steps=6), tmp_path / "b", data=tiny_data())
    for k, v in a.student.state_dict().items():
        assert torch.equal(v, b.student.state_dict()[k]), k
    assert seen == [(3, False), (6, False)]  # every eval_every steps and at the end, in eval mode
    assert [r["eval/score"] for r in read_metrics(tmp_path / "a") if "eval/score" in r] == [3.0, 6.0]


def test_learning_rate_schedules_see_each_optimizers_own_step_count(tmp_path):
    seen = {"a": [], "b": []}

    class Scheduled(Pair):
        def optimizers(self):
            specs = super().optimizers()
            for name, spec in specs.items():
                spec.lr_schedule = lambda k, name=name: seen[name].append(k) or (0.0 if k < 2 else 1.0)
            return specs

    method = Scheduled(tiny_teacher(), PairConfig(b_every=3, b_offset=1))
    a0 = state_of(method.student)
    snaps = []
    inner = method.losses
    method.losses = lambda batch, step, due: (snaps.append(state_of(method.student)), inner(batch, step, due))[1]
    train(method, tiny_config(max_steps=8), tmp_path, data=tiny_data())
    assert seen == {"a": list(range(8)), "b": [0, 1, 2]}  # b steps on iterations 1, 4, 7
    for k in a0:  # lr multiplier 0 for the first two steps: the student did not move
        assert torch.equal(snaps[2][k], a0[k]) and not torch.equal(snaps[3][k], a0[k]), k


def test_clipping_acts_on_the_gradient_the_optimizer_steps_with(tmp_path, monkeypatch):
    """Adam is nearly blind to a gradient's scale, so clipping is checked where it acts: the
    gradient norm each optimizer sees at its step is at most ``grad_clip``."""
    from fewstep.train import loop

    seen: list[float] = []
    make = loop.make_optimizer

    def recording(spec, params):
        opt = make(spec, params)
        norm = lambda: float(torch.sqrt(sum(p.grad.pow(2).sum() for p in params if p.grad is not None)))
        opt.register_step_pre_hook(lambda o, args, kwargs: seen.append(norm()))
        return opt

    monkeypatch.setattr(loop, "make_optimizer", recording)
    run_pair(tmp_path, {"max_steps": 4}, grad_clip=1e-3, lr=1.0, kind="adamw")
    assert len(seen) == 8 and max(seen) <= 1e-3 * (1 + 1e-5)


def test_frozen_networks_and_ema_copies_are_in_eval_mode_inside_losses(tmp_path):
    """A teacher with dropout must run without it: inside ``losses`` every frozen network and EMA
    copy is in eval mode, every trained network in train mode."""
    method = Pair(tiny_teacher(), PairConfig())
    inner, modes = method.losses, []

    def checking(batch, step, due):
        modes.append((method.teacher.training, method.frozen_head.training, method.b_ema.training,
                      method.student.training, method.b.training))  # fmt: skip
        return inner(batch, step, due)

    method.losses = checking
    train(method, tiny_config(max_steps=3), tmp_path, data=tiny_data())
    assert modes == [(False, False, False, True, True)] * 3


def test_denoise_loss_is_edms_weighted_formula():
    """EDM Eq. 2 with Table 1's weight, by hand on fixed sigma and noise."""
    from fewstep.methods.denoise import Denoise

    teacher = tiny_teacher()
    method = Denoise(teacher)
    x0 = torch.tensor([[0.3, -0.2], [1.0, 0.5], [-0.7, 0.1]])
    sigma, noise = torch.tensor([0.2, 1.0, 5.0]), torch.tensor([[0.5, -1.0], [0.1, 0.3], [-0.4, 2.0]])
    D = method.student(x0 + sigma[:, None] * noise, sigma, None)
    weight = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    want = (weight * (D - x0).pow(2).mean(1)).mean()
    torch.testing.assert_close(method.edm_loss(x0, None, sigma, noise), want)
    assert not torch.allclose(want, (D - x0).pow(2).mean())  # the weight matters on these inputs
