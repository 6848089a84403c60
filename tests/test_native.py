import json

import pytest
import torch

from fewstep.errors import FewstepError
from fewstep.io import atomic_write_json, load_tensors
from fewstep.teachers import load_teacher
from fewstep.teachers.native import build_model, load_model, save_model

NET = dict(resolution=8, in_channels=1, channels=8, channel_mult=(1, 2), blocks=1, attn_resolutions=(), num_classes=3)
DEN = dict(sample_shape=[1, 8, 8], num_classes=3)


def test_save_load_roundtrip(tmp_path):
    torch.manual_seed(0)
    m = build_model("unet", NET, DEN)
    for p in m.parameters():
        p.data.normal_(0, 0.1)
    save_model(m, tmp_path / "m", info={"note": "x"})
    m2 = load_teacher(str(tmp_path / "m"))
    x, s, y = torch.randn(2, 1, 8, 8), torch.tensor([0.5, 3.0]), torch.tensor([0, 3])
    assert torch.equal(m(x, s, y), m2(x, s, y))
    assert m2.info == {"note": "x"} and not any(p.requires_grad for p in m2.parameters())


def test_mismatched_config_is_refused(tmp_path):
    save_model(build_model("unet", NET, DEN), tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["net"]["channels"] = 16
    atomic_write_json(tmp_path / "m" / "config.json", cfg)
    with pytest.raises(FewstepError, match="weights do not match config.json"):
        load_model(tmp_path / "m")


def test_pickles_and_corrupt_files_are_refused(tmp_path):
    p = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(1)}, p)
    with pytest.raises(FewstepError, match="pickle-based"):
        load_tensors(p)
    with pytest.raises(FewstepError, match="pickle-based"):
        load_teacher(str(p))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 5)
    with pytest.raises(FewstepError, match="not a readable safetensors"):
        load_tensors(bad)


def test_unknown_specs():
    with pytest.raises(FewstepError, match="unknown builtin model 'cifar'"):
        load_teacher("builtin:cifar")
    with pytest.raises(FewstepError, match="neither a builtin"):
        load_teacher("/no/such/folder")
    with pytest.raises(FewstepError, match="unknown analytic"):
        load_teacher("analytic:nope")
