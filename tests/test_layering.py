"""The floors of the package (README, "Layout"): nothing imports upward, eval and train do not import
each other, and no method file imports another method file (helpers ``methods/_*.py`` and
``methods/base.py`` are shared)."""

from __future__ import annotations

import ast
from pathlib import Path

import fewstep

SRC = Path(fewstep.__file__).parent

# top to bottom; a module may import its own floor and the floors below it
FLOORS = [
    {"__main__", "cli", "commands"},
    {"eval", "train", "export"},
    {"runs"},
    {"methods"},
    {"students", "teachers", "networks", "pairs"},
    {"losses", "solvers", "schedules", "conversions", "guidance", "data", "options", "io", "seeding", "viz"},
    {"denoiser", "errors", "version", "__init__", "assets"},
]
SIDEWAYS_FORBIDDEN = [("eval", "train"), ("train", "eval")]


def part(module: str) -> str:
    """The top-level part of ``fewstep.X.Y`` (X)."""
    return module.split(".")[1] if module.count(".") >= 1 else "__init__"


def floor(name: str) -> int:
    for i, names in enumerate(FLOORS):
        if name in names:
            return i
    raise AssertionError(f"fewstep/{name} is on no floor of tests/test_layering.py; add it")


def imports(path: Path) -> list[str]:
    """Every ``fewstep.*`` module a file imports (also inside functions)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fewstep"):
            found.append(node.module if node.module != "fewstep" else "fewstep.__init__")
            if node.module == "fewstep":
                found += [f"fewstep.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("fewstep.")]
    return found


def test_nothing_imports_upward_and_eval_and_train_stay_apart():
    problems = []
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC)
        here = rel.parts[0].removesuffix(".py")
        for target in imports(path):
            there = part(target)
            if there == here:
                continue
            if floor(there) < floor(here) or (here, there) in SIDEWAYS_FORBIDDEN:
                problems.append(f"{rel} imports {target}")
    assert problems == []


# a method the paper defines as another method with one change subclasses it (f-distill is DMD2
# with a per-sample weight, SiDA is SiD with a GAN, TCM is ECT on a truncated range)
VARIANTS = {("fdistill", "dmd2"), ("sida", "sid"), ("tcm", "ect"), ("traflow", "ctm")}


def test_no_method_file_imports_another():
    methods = SRC / "methods"
    files = {p.stem for p in methods.glob("*.py") if not p.stem.startswith("_") and p.stem != "base"}
    problems = [
        f"methods/{p.name} imports {t}"
        for p in methods.glob("*.py")
        if p.stem in files
        for t in imports(p)
        if t.startswith("fewstep.methods.")
        and t.split(".")[2] in files
        and t.split(".")[2] != p.stem
        and (p.stem, t.split(".")[2]) not in VARIANTS
    ]
    assert problems == []
