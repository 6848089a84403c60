import subprocess
import sys

import numpy as np
import pytest
import torch

from fewstep.cli import main
from fewstep.teachers.native import build_model, save_model


@pytest.fixture
def tiny_model(tmp_path):
    torch.manual_seed(0)
    m = build_model(
        "unet",
        dict(resolution=8, in_channels=1, channels=8, channel_mult=(1,), blocks=1, attn_resolutions=(), num_classes=10),
        dict(sample_shape=[1, 8, 8], num_classes=10),
    )
    for p in m.parameters():
        p.data.normal_(0, 0.05)
    return save_model(m, tmp_path / "model")


def test_sample_png_and_npz(tiny_model, tmp_path):
    assert (
        main(["sample", "--model", str(tiny_model), "--steps", "3", "-n", "6", "--out", str(tmp_path / "g.png")]) == 0
    )
    assert (tmp_path / "g.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (
        main(
            [
                "sample",
                "--model",
                str(tiny_model),
                "--steps",
                "3",
                "-n",
                "5",
                "--label",
                "7",
                "--guidance",
                "2",
                "--out",
                str(tmp_path / "s.npz"),
            ]
        )
        == 0
    )
    z = np.load(tmp_path / "s.npz")
    assert z["samples"].shape == (5, 1, 8, 8) and (z["labels"] == 7).all() and list(z["seeds"]) == [0, 1, 2, 3, 4]


def test_same_seed_same_sample_whatever_the_batch(tiny_model, tmp_path):
    main(
        [
            "sample",
            "--model",
            str(tiny_model),
            "--steps",
            "2",
            "-n",
            "7",
            "--batch",
            "7",
            "--out",
            str(tmp_path / "a.npz"),
        ]
    )
    main(
        [
            "sample",
            "--model",
            str(tiny_model),
            "--steps",
            "2",
            "-n",
            "7",
            "--batch",
            "3",
            "--out",
            str(tmp_path / "b.npz"),
        ]
    )
    main(
        [
            "sample",
            "--model",
            str(tiny_model),
            "--steps",
            "2",
            "-n",
            "2",
            "--seed",
            "5",
            "--out",
            str(tmp_path / "c.npz"),
        ]
    )
    a, b, c = (np.load(tmp_path / f"{k}.npz") for k in "abc")
    np.testing.assert_allclose(a["samples"], b["samples"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(a["samples"][5:], c["samples"], rtol=1e-4, atol=1e-5)
    assert (a["labels"][5:] == c["labels"]).all()


@pytest.mark.parametrize(
    "extra,msg",
    [
        (["--model", "builtin:nope"], "unknown builtin model"),
        (["--solver", "rk9"], "unknown solver"),
        (["--steps", "0"], "--steps must be >= 1"),
        (["--label", "12"], "--label must lie in"),
    ],
)
def test_sample_errors_exit_nonzero_and_write_nothing(tiny_model, tmp_path, capsys, extra, msg):
    argv = ["sample", "--model", str(tiny_model), "--steps", "2", "-n", "2", "--out", str(tmp_path / "x.png"), *extra]
    assert main(argv) == 2  # argparse keeps the last value of a repeated option
    err = capsys.readouterr().err
    assert err.startswith("error: ") and msg in err and err.count("\n") == 1
    assert not (tmp_path / "x.png").exists()


def test_teacher_train_cli_on_moons(tmp_path):
    out = tmp_path / "moons"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "fewstep",
            "teacher",
            "train",
            "--data",
            "moons:2000",
            "--out",
            str(out),
            "--steps",
            "30",
            "--batch",
            "64",
            "--net",
            '{"hidden": 32, "depth": 2}',
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    # a run folder on the engine: checkpoints, metrics, and the teacher as its student
    assert (out / "student" / "model.safetensors").is_file() and (out / "metrics.jsonl").is_file()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000030"]
    assert main(["sample", "--model", str(out), "--steps", "4", "-n", "50", "--out", str(tmp_path / "m.png")]) == 0
    from fewstep.teachers import load_teacher

    assert load_teacher(out).info["data"] == {"kind": "moons", "split": "train", "n": 2000, "convert": False}
    # --resume continues the same run
    assert main(["teacher", "train", "--out", str(out), "--resume", "--steps", "40"]) == 0
    assert load_teacher(out).info["step"] == 40
    # refusing to overwrite a non-empty folder
    r = subprocess.run(
        [sys.executable, "-m", "fewstep", "teacher", "train", "--data", "moons", "--out", str(out), "--steps", "5"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "already exists" in r.stderr
