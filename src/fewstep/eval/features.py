"""Feature extractors for FID/KID and precision/recall, behind one small interface.

Every extractor is an ``nn.Module`` with a ``name`` (part of the reference-statistics cache key),
a feature ``dim``, an :meth:`Features.check` that refuses inputs of the wrong shape with one line,
and :meth:`Features.features` mapping ``(N, *shape)`` samples in [-1, 1] to ``(N, dim)`` features
(in batches, without gradients). Because each is a module returning ``(N, dim)``, it can also be
handed to torchmetrics' ``FrechetInceptionDistance(feature=...)`` directly.

- :class:`ClassifierFeatures` — the penultimate layer of a small CNN: the shipped digits one (8x8
  grey images, ``digits``), or one trained on an image folder's training split (``data``: on its
  class labels, or — for a folder without class sub-folders — on predicting which of four
  rotations an image was turned by, Gidaris et al. 2018, arXiv 1803.07728). Trained in a minute or
  two, cached by the folder's digest, its held-out accuracy in the report. Limits: a small network
  on one folder knows only what tells its classes (or orientations) apart, so its FID is a
  measure *within this data*, not comparable with Inception FIDs; rotation features are weak for
  data whose images look alike at every rotation (textures, centred symmetric shapes);
- :class:`InceptionFeatures` — Inception-v3 pool3 (2048-d), only from weights already on disk;
- :class:`RawFeatures` — the coordinates themselves, for 2-D (or any vector) data.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from fewstep.errors import FewstepError


class Features(nn.Module):
    """Base class: ``name``, ``dim``, ``input_shape`` (``None`` entries are free)."""

    name: str = ""
    dim: int = 0
    input_shape: tuple[int | None, ...] = ()

    @property
    def num_features(self) -> int:  # what torchmetrics looks for on a custom feature module
        return self.dim

    def check(self, x: Tensor) -> None:
        """Raise :class:`FewstepError` unless ``x`` is ``(N, *input_shape)``."""
        want = self.input_shape
        got = tuple(x.shape[1:])
        if len(got) != len(want) or any(w is not None and w != g for w, g in zip(want, got, strict=True)):
            shown = "x".join("*" if w is None else str(w) for w in want)
            raise FewstepError(
                f"the {self.name} feature extractor takes samples of shape {shown}, got {'x'.join(map(str, got))}; "
                f"pick a matching --features ({', '.join(EXTRACTORS)})"
            )

    def _features(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.no_grad()
    def features(self, x: Tensor, batch: int = 1000) -> Tensor:
        """``(N, dim)`` float64 features of samples ``x`` in [-1, 1]."""
        self.check(x)
        out = [self._features(x[i : i + batch].float()).double() for i in range(0, x.shape[0], batch)]
        return torch.cat(out) if out else torch.zeros(0, self.dim, dtype=torch.float64)

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x)


class RawFeatures(Features):
    """The sample coordinates as features (2-D toys, small vectors)."""

    def __init__(self, dim: int = 2) -> None:
        super().__init__()
        self.dim = dim
        self.input_shape = (dim,)
        self.name = f"raw{dim}"

    def _features(self, x: Tensor) -> Tensor:
        return x


class ClassifierFeatures(Features):
    """Penultimate layer of a fewstep feature CNN (see :mod:`fewstep.eval.classifier`): the shipped
    digits one (8x8 grey), or one trained on a folder's training split (``--features data``)."""

    def __init__(self, folder: str | Path | None = None, prefix: str = "digits-cnn") -> None:
        super().__init__()
        from fewstep.networks.classifier import load_classifier, shipped_path

        folder = Path(folder) if folder is not None else shipped_path()
        self.net = load_classifier(folder)
        cfg = self.net.cfg
        self.dim = cfg.feature_dim
        self.input_shape = (cfg.in_channels, cfg.resolution, cfg.resolution)
        digest = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()[:12]
        self.name = f"{prefix}-{digest}"
        self.record = getattr(self.net, "record", {})
        self.predicts_labels = cfg.task == "labels"

    def _features(self, x: Tensor) -> Tensor:
        return self.net.features(x.clamp(-1, 1))

    @torch.no_grad()
    def predict(self, x: Tensor, batch: int = 1000) -> Tensor:
        """Predicted class of each sample (for the label accuracy of conditional samples)."""
        self.check(x)
        return torch.cat([self.net(x[i : i + batch].float().clamp(-1, 1)).argmax(1) for i in range(0, len(x), batch)])


INCEPTION_FILES = ("pt_inception-2015-12-05-6726825d.pth", "weights-inception-2015-12-05-6726825d.pth")


def _torch_hub_checkpoints() -> Path:
    return Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch")) / "hub" / "checkpoints"


def find_inception_weights(path: str | Path | None = None) -> Path:
    """The FID Inception-v3 weights: ``path`` if given, else the torch hub cache. Never downloads."""
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FewstepError(f"Inception weights {p} do not exist; pass the path of pt_inception-2015-12-05-*.pth")
        return p
    for name in INCEPTION_FILES:
        p = _torch_hub_checkpoints() / name
        if p.is_file():
            return p
    raise FewstepError(
        f"Inception-v3 weights not found in {_torch_hub_checkpoints()} and fewstep never downloads them; copy "
        f"{INCEPTION_FILES[0]} there or pass --inception-weights PATH (or use --features digits)"
    )


class InceptionFeatures(Features):
    """Inception-v3 pool3 features (2048-d) through torch-fidelity, from local weights only.

    The ``.pth`` file is read by torch's restricted ``weights_only`` loader (tensors only, no code
    runs), as torch-fidelity does. Images in [-1, 1], 1 or 3 channels, any size (resized to 299).
    """

    input_shape = (None, None, None)
    dim = 2048

    def __init__(self, weights: str | Path | None = None) -> None:
        super().__init__()
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ImportError:
            raise FewstepError(
                "Inception features need the optional package torch-fidelity: pip install 'fewstep[inception]' "
                "(or use --features digits)"
            ) from None
        path = find_inception_weights(weights)
        self.net = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path)
        )
        self.net.eval().requires_grad_(False)
        self.name = f"inception-{path.name[:24]}"

    def check(self, x: Tensor) -> None:
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise FewstepError(f"Inception features take images (N, 1 or 3, H, W), got shape {tuple(x.shape)}")

    def _features(self, x: Tensor) -> Tensor:
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        u8 = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # torch-fidelity takes uint8 images
        return self.net(u8)[0].reshape(x.shape[0], -1)


EXTRACTORS = ("data", "digits", "inception", "raw")


def get_extractor(
    name: str, sample_shape: tuple[int, ...], weights: str | Path | None = None, data=None, progress=print
) -> Features:
    """Build an extractor by name and check it takes samples of ``sample_shape`` (before anything
    is sampled). ``data`` (a :class:`~fewstep.data.DataSpec`) is the reference data, which
    ``data`` features are trained on. ``auto`` picks ``raw`` for vectors, ``digits`` for the 8x8
    digits, ``data`` for an image folder, else ``inception``."""
    if name == "auto":
        if len(sample_shape) == 1:
            name = "raw"
        elif tuple(sample_shape) == (1, 8, 8) and (data is None or data.kind == "digits"):
            name = "digits"
        else:
            name = "data" if data is not None and data.kind in ("folder", "mnist") else "inception"
    extractor = _build(name, sample_shape, weights, data, progress)
    extractor.check(torch.zeros(1, *sample_shape))
    return extractor


def _build(name: str, sample_shape: tuple[int, ...], weights, data, progress) -> Features:
    if name == "data":
        if weights is not None:
            return ClassifierFeatures(weights, prefix="data-cnn")
        if data is not None and data.kind == "mnist":
            from fewstep.eval.classifier import classifier_for

            return ClassifierFeatures(classifier_for(data, progress), prefix="mnist-cnn")
        if data is None or data.kind != "folder":
            raise FewstepError(
                f"--features data trains a classifier on an image folder, and the reference data is {data}; "
                "pass the folder with --data, or pick --features digits/inception/raw"
            )
        if tuple(sample_shape) != (data.channels, data.resolution, data.resolution):
            raise FewstepError(
                f"the samples are {'x'.join(map(str, sample_shape))} but the data folder {data.path} holds "
                f"{data.channels}x{data.resolution}x{data.resolution} images; pass the teacher's data with --data"
            )
        from fewstep.eval.classifier import classifier_for

        return ClassifierFeatures(classifier_for(data, progress), prefix="data-cnn")
    if name == "digits":
        return ClassifierFeatures(weights)
    if name == "inception":
        return InceptionFeatures(weights)
    if name == "raw":
        if len(sample_shape) != 1:
            raise FewstepError(f"raw features are for vector data; samples of shape {sample_shape} are images")
        return RawFeatures(sample_shape[0])
    raise FewstepError(f"unknown feature extractor {name!r}; use one of {', '.join(EXTRACTORS)} or auto")
