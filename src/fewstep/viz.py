"""Pictures: image grids and 2-D scatter plots (matplotlib's Agg backend, no display needed)."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from fewstep.io import umask_mode


def _atomic_save(path: Path, save) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    try:
        save(tmp)
        os.chmod(tmp, umask_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def image_grid(x: Tensor, nrow: int | None = None, scale: int | None = None, pad: int = 1) -> Image.Image:
    """A PIL image of samples ``(N, C, H, W)`` in [-1, 1]; small images are upscaled for viewing."""
    x = x.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).cpu()
    n, c, h, w = x.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol = math.ceil(n / nrow)
    grid = torch.full((c, ncol * (h + pad) + pad, nrow * (w + pad) + pad), 255, dtype=torch.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        grid[:, pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w] = x[i]
    arr = grid.permute(1, 2, 0).numpy()
    im = Image.fromarray(arr[:, :, 0] if c == 1 else arr, mode="L" if c == 1 else "RGB")
    scale = scale or max(1, 256 // max(h, w) // 2)
    return im.resize((im.width * scale, im.height * scale), Image.Resampling.NEAREST)


def save_grid(x: Tensor, path: str | Path, nrow: int | None = None) -> Path:
    path = Path(path)
    im = image_grid(x, nrow)
    _atomic_save(path, lambda p: im.save(p, format="PNG"))
    return path


def save_scatter(x: Tensor, path: str | Path, reference: Tensor | None = None, title: str = "") -> Path:
    """Scatter plot of 2-D samples, with optional reference points in grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    if reference is not None:
        r = reference.detach().cpu().numpy()
        ax.scatter(r[:, 0], r[:, 1], s=2, c="0.8", label="data")
    p = x.detach().cpu().numpy()
    ax.scatter(p[:, 0], p[:, 1], s=2, c="C0", label="samples")
    ax.set_aspect("equal")
    ax.set_title(title)
    fig.tight_layout()
    _atomic_save(path, lambda t: fig.savefig(t, format="png"))
    plt.close(fig)
    return path


def save_npz(path: str | Path, samples: Tensor, labels: Tensor | None, seeds) -> Path:
    path = Path(path)
    arrays = {"samples": samples.detach().cpu().numpy(), "seeds": np.asarray(list(seeds))}
    if labels is not None:
        arrays["labels"] = labels.cpu().numpy()

    def save(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    _atomic_save(path, save)
    return path


@torch.no_grad()
def as_images(model, x: Tensor, batch: int = 500) -> Tensor:
    """Samples of ``model`` as images: a latent teacher's (or its student's) VAE decodes them."""
    if getattr(model, "vae", None) is None or not hasattr(model, "decode"):
        return x
    return torch.cat([model.decode(x[i : i + batch]) for i in range(0, len(x), batch)]).clamp(-1, 1)


def save_samples(samples: Tensor, labels: Tensor | None, seeds, out: str | Path, model=None) -> Path:
    """Write samples as ``.npz`` (raw, latents as they are), or a PNG grid (images; a latent
    ``model``'s samples decoded by its VAE) / scatter plot (2-D data)."""
    out = Path(out)
    if out.suffix == ".npz":
        return save_npz(out, samples, labels, seeds)
    if out.suffix.lower() != ".png":
        from fewstep.errors import FewstepError

        raise FewstepError(f"--out {out}: use a .png (picture) or .npz (raw samples) path")
    if samples.ndim == 4:
        return save_grid(as_images(model, samples), out)
    return save_scatter(samples, out)
