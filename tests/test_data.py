import numpy as np
import pytest
import torch
from PIL import Image

from fewstep.data import DataSpec, digits, image_folder, load_dataset, parse_data, toy
from fewstep.errors import FewstepError


def test_digits_splits_are_disjoint_and_scaled():
    tr, te = digits("train"), digits("test")
    assert tr.x.shape[1:] == (1, 8, 8) and len(tr) + len(te) == 1797
    assert tr.x.min() == -1 and tr.x.max() == 1 and tr.num_classes == 10
    flat_tr = {tuple(v.tolist()) for v in tr.x.flatten(1)}
    overlap = sum(tuple(v.tolist()) in flat_tr for v in te.x.flatten(1))
    assert overlap < 5  # only exact duplicates inside the original data set can coincide


@pytest.mark.parametrize("name", ["moons", "gaussians8", "checkerboard"])
def test_toys(name):
    d = toy(name, 1000)
    assert d.x.shape == (1000, 2) and d.x.abs().max() < 2.0
    assert load_dataset(f"{name}:500").x.shape == (500, 2)


def _write(path, size, mode="L", value=128):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size) if mode == "L" else (size, size, 3), value, dtype=np.uint8), mode).save(path)


def test_image_folder_with_classes(tmp_path):
    _write(tmp_path / "cats" / "a.png", 16)
    _write(tmp_path / "dogs" / "b.jpg", 12, "RGB", 255)
    with pytest.raises(FewstepError, match=r"differ in size: most are .*(b\.jpg|a\.png).*--convert"):
        image_folder(tmp_path)
    d = image_folder(tmp_path, resolution=8, channels=3, convert=True)
    assert d.x.shape == (2, 3, 8, 8) and d.num_classes == 2
    assert d.labels.tolist() == [0, 1]
    assert torch.allclose(d.x[1], torch.ones(3, 8, 8))


def test_image_folder_errors(tmp_path):
    with pytest.raises(FewstepError, match="does not exist"):
        image_folder(tmp_path / "nope", 8)
    with pytest.raises(FewstepError, match="holds no"):
        image_folder(tmp_path, 8)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(FewstepError, match="cannot read image"):
        image_folder(tmp_path, 8)
    with pytest.raises(FewstepError, match="neither a known data set"):
        load_dataset(str(tmp_path / "missing"))


def _folder(root, n=40, size=28, mode="L"):
    """A class folder of ``n`` small images (two classes) of one size and mode."""
    rng = np.random.default_rng(0)
    for i in range(n):
        shape = (size, size) if mode == "L" else (size, size, 3)
        path = root / f"c{i % 2}" / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(path)
    return root


def test_folder_spec_is_detected_absolute_and_round_trips(tmp_path, monkeypatch):
    _folder(tmp_path / "imgs")
    monkeypatch.chdir(tmp_path)
    spec = parse_data("imgs")
    assert spec == DataSpec("folder", "train", str(tmp_path / "imgs"), 28, 1)  # greyscale stays 1 channel
    assert parse_data(spec.to_dict()) == spec and parse_data(f"{tmp_path}/imgs:test").split == "test"
    tr, te, al = (load_dataset(spec.with_split(s)) for s in ("train", "test", "all"))
    assert tr.x.shape[1:] == (1, 28, 28) and len(tr) + len(te) == len(al) == 40 and len(te) > 0
    assert tr.spec == spec and te.spec == spec.held_out()
    names = lambda d: {tuple(v.tolist()) for v in d.x.flatten(1)[:, :8]}
    assert not names(tr) & names(te)  # disjoint splits
    monkeypatch.chdir("/")
    assert torch.equal(load_dataset(spec.to_dict()).x, tr.x)  # reloads from any directory


def test_folder_refuses_what_it_would_silently_change(tmp_path):
    root = _folder(tmp_path / "imgs")
    with pytest.raises(FewstepError, match="are 28x28 but --resolution 32 was given.*--convert"):
        parse_data(str(root), resolution=32)
    assert load_dataset(str(root), resolution=32, convert=True).x.shape[-1] == 32
    with pytest.raises(FewstepError, match="greyscale .* but --channels 3"):
        parse_data(str(root), channels=3)
    _write(root / "c0" / "rgb.png", 28, "RGB")
    with pytest.raises(FewstepError, match=r"mix greyscale and colour: c0/rgb\.png"):
        parse_data(str(root))
    (root / "c0" / "rgb.png").unlink()
    Image.fromarray(np.zeros((32, 40), dtype=np.uint8), "L").save(root / "c1" / "wide.png")
    with pytest.raises(FewstepError, match=r"most are 28x28, but c1/wide\.png \(40x32\)"):
        parse_data(str(root))
    assert load_dataset(str(root), convert=True).x.shape[1:] == (1, 28, 28)
