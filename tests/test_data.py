import numpy as np
import pytest
import torch
from PIL import Image

from fewstep.data import digits, image_folder, load_dataset, toy
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
    d = image_folder(tmp_path, resolution=8, channels=3)
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
    with pytest.raises(FewstepError, match="--resolution"):
        load_dataset(str(tmp_path))
