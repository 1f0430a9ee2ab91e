"""The embedded default backbone ships with aid and serves `aid inpaint` offline (README's first command)."""

import numpy as np
from PIL import Image

from aid_cli.backbones.checkpoint import load_backbone
from aid_cli.models.catalogue import EMBEDDED_BACKBONE, resolve_backbone
from aid_cli.paths import weights_dir

from .conftest import REPO, run_cli


def test_embedded_backbone_is_shipped_small_and_loads():
    path = resolve_backbone(None)
    assert path == weights_dir() / EMBEDDED_BACKBONE
    assert path.stat().st_size < 50 * 2 ** 20
    net, info = load_backbone(path)
    assert info["resolution"] == 64 and info["precond"] == "EDMPrecond"
    assert info["provenance"]["trained_by"] == "aid pretrain" and info["provenance"]["images_seen"] > 0
    assert (weights_dir() / "README.md").is_file()  # the model card


def test_readme_first_command_works_offline(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    image, mask = REPO / "examples" / "chelsea.png", REPO / "examples" / "chelsea_mask.png"
    out = tmp_path / "filled.png"
    code, _, err = run_cli(["inpaint", image, "--mask", mask, "-o", out], capsys)
    assert code == 0, err
    before, after = np.asarray(Image.open(image)), np.asarray(Image.open(out))
    hole = np.asarray(Image.open(mask).convert("L")) >= 128
    assert before.shape == after.shape
    assert np.array_equal(before[~hole], after[~hole])  # every visible pixel bit-exact
    assert (before[hole] != after[hole]).any()
