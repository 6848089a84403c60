"""Plant plausible defects one at a time and check that the test suite catches each (a mutation check).

Each mutant is one textual change to a copy of ``src/`` (the working tree is never touched) and the
test files that should fail with it; the mutated copy is put first on ``PYTHONPATH`` and pytest runs
those files. A mutant that leaves them green *survived*: a defect of that kind would go unnoticed.

    .venv/bin/python bench/mutants.py            # all mutants; exit 1 if any survived
    .venv/bin/python bench/mutants.py --list     # what they are
    .venv/bin/python bench/mutants.py dmd-normaliser sid-psi-dropout
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name: (file under src/fewstep, text, replacement, test files)
MUTANTS = {
    "engine-no-clipping": (
        "train/loop.py",
        "        if spec.grad_clip is not None:",
        "        if False:",
        ["tests/test_engine_loop.py"],
    ),
    "engine-frozen-in-train-mode": (
        "train/loop.py",
        "        module.to(device).eval().requires_grad_(False)",
        "        module.to(device).train().requires_grad_(False)",
        ["tests/test_engine_loop.py"],
    ),
    "engine-ema-no-ramp-up": (
        "train/config.py",
        "            half = min(half, (step + 1) * self.batch * self.ema_rampup)",
        "            pass",
        ["tests/test_faithful_defaults.py"],
    ),
    "dmd-normaliser": (
        "losses.py",
        "    return torch.nan_to_num((pred_fake - pred_real) / append_dims(weight, x.ndim))",
        "    return torch.nan_to_num(pred_fake - pred_real)",
        ["tests/test_method_dmd.py"],
    ),
    "pd-weight-min-snr": (
        "losses.py",
        "        return sigma.pow(-2).clamp_min(1.0)",
        "        return sigma.pow(-2).clamp_max(1.0)",
        ["tests/test_method_progressive.py"],
    ),
    "denoise-no-edm-weight": (
        "losses.py",
        "    return (edm_weight(sigma, model.sigma_data) * (D - x0).pow(2).flatten(1).mean(1)).mean()",
        "    return (D - x0).pow(2).flatten(1).mean(1).mean()",
        ["tests/test_engine_loop.py"],
    ),
    "ctm-outer-jump-by-student": (
        "methods/ctm.py",
        "        estimate = self.target(self.student(x_t, t, s, cond), s, eps, cond)",
        "        estimate = self.student(self.student(x_t, t, s, cond), s, eps, cond)",
        ["tests/test_method_ctm.py"],
    ),
    "ctm-inner-jump-by-ema": (
        "methods/ctm.py",
        '        inner = self.student if self.config.target_inner == "student" else self.target',
        "        inner = self.target",
        ["tests/test_method_ctm.py"],
    ),
    "sid-psi-dropout": (
        "methods/sid.py",
        "with no_param_grad(self.fake_score), eval_mode(self.fake_score):",
        "with no_param_grad(self.fake_score):",
        ["tests/test_fake_score.py"],
    ),
    "dmd-psi-dropout": (
        "methods/dmd.py",
        "        with eval_mode(self.fake_score):  # a score estimate",
        "        with torch.enable_grad():  # a score estimate",
        ["tests/test_fake_score.py"],
    ),
    "dmd2-teacher-dropout": (
        "methods/dmd2.py",
        "    dropout: float | None = 0.0  # of G and psi",
        "    dropout: float | None = None  # of G and psi",
        ["tests/test_fake_score.py"],
    ),
    "diff-instruct-two-masks": (
        "methods/diff_instruct.py",
        "            real, fake = shared_dropout(self.real_score, self.fake_score, x_t, sigma, cond)",
        "            real, fake = self.real_score(x_t, sigma, cond), self.fake_score(x_t, sigma, cond)",
        ["tests/test_fake_score.py"],
    ),
    "sid-generator-before-psi": (
        "methods/_fake_score.py",
        '"student": OptimizerSpec(["student"], lr=c.lr, betas=c.betas, every=k + 1, offset=k,',
        '"student": OptimizerSpec(["student"], lr=c.lr, betas=c.betas, every=k + 1, offset=0,',
        ["tests/test_method_sid.py"],
    ),
    "gan-generator-sign": (
        "networks/discriminator.py",
        "        return -fake_logits.mean()",
        "        return fake_logits.mean()",
        ["tests/test_discriminator.py", "tests/test_method_add.py"],
    ),
}


def run(name: str, python: str) -> bool:
    """Whether the mutant ``name`` is killed (its test files fail)."""
    rel, old, new, tests = MUTANTS[name]
    with tempfile.TemporaryDirectory(prefix=f"mutant-{name}-") as tmp:
        shutil.copytree(ROOT / "src", Path(tmp) / "src")
        path = Path(tmp) / "src" / "fewstep" / rel
        text = path.read_text()
        if text.count(old) != 1:
            raise SystemExit(f"mutant {name}: the text to change occurs {text.count(old)} times in {rel}; update it")
        path.write_text(text.replace(old, new))
        env = {**os.environ, "PYTHONPATH": str(Path(tmp) / "src"), "OMP_NUM_THREADS": "1"}
        cmd = [python, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        return r.returncode != 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("names", nargs="*", help="mutants to run (default: all)")
    p.add_argument("--list", action="store_true", help="list the mutants")
    args = p.parse_args()
    if args.list:
        for name, (rel, _, _, tests) in MUTANTS.items():
            print(f"{name:32s} {rel:28s} {' '.join(tests)}")
        return 0
    names = args.names or list(MUTANTS)
    unknown = [n for n in names if n not in MUTANTS]
    if unknown:
        raise SystemExit(f"unknown mutant(s) {', '.join(unknown)}; --list shows them")
    survived = []
    for name in names:
        killed = run(name, sys.executable)
        print(f"{'killed  ' if killed else 'SURVIVED'} {name}", flush=True)
        if not killed:
            survived.append(name)
    print(f"{len(names) - len(survived)} of {len(names)} mutants killed")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
