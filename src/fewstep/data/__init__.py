"""Data sets: scikit-learn's 8x8 digits, 2-D toys, and image folders — all in [-1, 1].

``load_dataset(spec)`` returns a :class:`TensorDataset`-like pair ``(x, labels)`` held in memory:
- ``digits`` (``digits:train`` / ``digits:test``): the 1,797 bundled 8x8 handwritten digits with
  labels; a fixed 80/20 split so held-out digits measure the FID floor;
- ``moons``, ``gaussians8``, ``checkerboard`` (2-D; ``moons:N`` picks the count);
- a folder of PNG/JPEG images (resized; labels from sub-folders when present).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fewstep.errors import FewstepError

TOYS = ("moons", "gaussians8", "checkerboard")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass
class Dataset:
    """In-memory data: ``x`` in [-1, 1] of shape ``(N, *sample_shape)``, ``labels`` ``(N,)`` or None."""

    x: Tensor
    labels: Tensor | None
    num_classes: int
    name: str

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def __len__(self) -> int:
        return self.x.shape[0]


def digits(split: str = "train", seed: int = 0) -> Dataset:
    """scikit-learn's digits (values 0..16) scaled to [-1, 1], shape (N, 1, 8, 8)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 8.0 - 1.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = len(x) // 5
    if split == "train":
        idx = perm[n_test:]
    elif split == "test":
        idx = perm[:n_test]
    elif split == "all":
        idx = perm
    else:
        raise FewstepError(f"unknown digits split {split!r}; use train, test or all")
    return Dataset(x[idx], y[idx], 10, f"digits:{split}")


def toy(name: str, n: int = 20000, seed: int = 0) -> Dataset:
    """2-D toy data scaled to roughly [-1, 1]."""
    rng = np.random.default_rng(seed)
    if name == "moons":
        from sklearn.datasets import make_moons

        pts, lab = make_moons(n, noise=0.05, random_state=seed)
        pts = (pts - np.array([0.5, 0.25])) / np.array([1.0, 0.5]) * 0.5 * np.array([1.5, 1.0])
        return Dataset(torch.tensor(pts, dtype=torch.float32), torch.tensor(lab), 2, name)
    if name == "gaussians8":
        k = rng.integers(0, 8, n)
        ang = k * 2 * math.pi / 8
        pts = np.stack([np.cos(ang), np.sin(ang)], 1) + 0.05 * rng.standard_normal((n, 2))
        return Dataset(torch.tensor(pts, dtype=torch.float32), torch.tensor(k), 8, name)
    if name == "checkerboard":
        return Dataset(torch.tensor(_checker(rng, n), dtype=torch.float32), None, 0, name)
    raise FewstepError(f"unknown toy data {name!r}; use one of {', '.join(TOYS)}")


def _checker(rng: np.random.Generator, n: int) -> np.ndarray:
    """4x4 checkerboard on [-1, 1]^2: uniform over the 'black' squares."""
    cells = [(i, j) for i in range(4) for j in range(4) if (i + j) % 2 == 0]
    c = np.array(cells)[rng.integers(0, len(cells), n)]
    return (c + rng.uniform(size=(n, 2))) / 2 - 1


def image_folder(path: str | Path, resolution: int, channels: int = 3) -> Dataset:
    """Images under ``path`` (PNG/JPEG), resized to ``resolution``; sub-folders become labels."""
    from PIL import Image, UnidentifiedImageError

    root = Path(path)
    if not root.is_dir():
        raise FewstepError(f"data folder {root} does not exist; pass a folder of PNG/JPEG images")
    if channels not in (1, 3):
        raise FewstepError(f"channels must be 1 or 3, got {channels}")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FewstepError(f"data folder {root} holds no .png/.jpg/.jpeg images; add some or fix the path")
    classes = sorted({p.parent.relative_to(root).parts[0] for p in files if p.parent != root})
    if classes and any(p.parent == root for p in files):
        raise FewstepError(f"{root} mixes images at its top level with class sub-folders; move them into sub-folders")
    mode = "L" if channels == 1 else "RGB"
    xs = []
    for p in files:
        try:
            with Image.open(p) as im:
                im = im.convert(mode).resize((resolution, resolution), Image.Resampling.BICUBIC)
        except (UnidentifiedImageError, OSError) as e:
            raise FewstepError(f"cannot read image {p} ({e.__class__.__name__}); remove or replace it") from None
        a = np.asarray(im, dtype=np.float32).reshape(resolution, resolution, channels)
        xs.append(torch.from_numpy(a).permute(2, 0, 1) / 127.5 - 1)
    labels = None
    if classes:
        index = {c: i for i, c in enumerate(classes)}
        labels = torch.tensor([index[p.parent.relative_to(root).parts[0]] for p in files])
    return Dataset(torch.stack(xs), labels, len(classes), str(root))


def load_dataset(spec: str, resolution: int | None = None, channels: int | None = None) -> Dataset:
    """Resolve a data spec (see module docstring)."""
    name, _, arg = spec.partition(":")
    if name == "digits":
        return digits(arg or "train")
    if name in TOYS:
        return toy(name, int(arg) if arg else 20000)
    if resolution is None:
        raise FewstepError(f"{spec!r} is not a known data set; for an image folder also give --resolution")
    return image_folder(spec, resolution, channels or 3)
