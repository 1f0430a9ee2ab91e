"""One vocabulary of method names for `aid inpaint --method`, `aid bench --methods` and `aid methods`
(methods/base.parse_method): a registered method, an operating point (aid-12, aid-18) or aid-18:NAME, accepted by
every command or refused by every command, with the same line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from aid_cli.errors import UserError
from aid_cli.methods.base import METHODS, OPERATING_POINTS, parse_method
from aid_cli.resolve import check_inpaint_method, check_method_names

from .conftest import run_cli

NAMES = ["dps", "aid", "aid-18", "aid-12", "aid-18:aid-cats64-guidance", "aid:aid-cats64-guidance", "dsp", "aid-24",
         "dps:x", "aid-18:", "aid-18:nope", "AID-18", ""]


def _outcome(check, label):
    try:
        check(label)
        return "ok"
    except UserError as e:
        return str(e)


@pytest.mark.parametrize("label", NAMES)
def test_inpaint_and_bench_accept_and_refuse_the_same_names_with_the_same_line(label):
    bench = _outcome(lambda m: check_method_names([m]), label)
    inpaint = _outcome(lambda m: check_inpaint_method(m, None), label)
    assert bench == inpaint
    assert (bench == "ok") == (label in ("dps", "aid", "aid-18", "aid-12", "aid-18:aid-cats64-guidance",
                                         "aid:aid-cats64-guidance"))


def test_operating_points_fix_their_steps_and_a_different_steps_is_one_line():
    assert parse_method("aid-12").steps == 12 and parse_method("aid-18:aid-cats64-guidance").steps == 18
    assert parse_method("aid-12").steps_for(None) == 12 and parse_method("aid-12").steps_for(12) == 12
    assert parse_method("dps").steps_for(None) == 18 and parse_method("dps").steps_for(7) == 7
    with pytest.raises(UserError, match=r"--method aid-12 runs N = 12 steps, but --steps 18 was given"):
        parse_method("aid-12").steps_for(18)


def test_a_misspelt_method_names_the_closest_one():
    with pytest.raises(UserError, match=r"unknown method 'dsp': did you mean dps\?"):
        parse_method("dsp")
    with pytest.raises(UserError, match=r"did you mean aid-18\?"):
        parse_method("aid-81")


def test_aid_methods_lists_the_operating_points(capsys):
    code, out, err = run_cli(["methods"], capsys)
    assert code == 0, err
    names = [line.split()[0] for line in out.splitlines()]
    assert set(names) == set(METHODS) | set(OPERATING_POINTS)
    for name in names:  # every name `aid methods` lists is one the commands take
        parse_method(name)
    assert "aid-12:NAME" in out and "23 NFE" in out


# ------------------------------------------------------------------------------------------- aid inpaint --method


@pytest.fixture
def pair(tmp_path):
    rng = np.random.default_rng(0)
    img, mask = tmp_path / "img.png", tmp_path / "mask.png"
    Image.fromarray(rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)).save(img)
    hole = np.zeros((24, 20), np.uint8)
    hole[6:14, 5:12] = 255
    Image.fromarray(hole).save(mask)
    return img, mask


@pytest.fixture
def tiny_guidance(tmp_path, tiny_checkpoint):
    """A random (non-zero) guidance module for the tiny backbone."""
    from aid_cli.fileio import sha256_file
    from aid_cli.guidance.checkpoint import save_guidance
    from aid_cli.guidance.networks import Actor

    torch.manual_seed(0)
    actor = Actor(width=8)
    torch.nn.init.normal_(actor.out.weight, std=0.05)
    return save_guidance(tmp_path / "g.safetensors", actor, {"width": 8}, sha256_file(tiny_checkpoint))


@pytest.mark.parametrize("method,nfe", [("aid-18", 35), ("aid-12", 23)])
def test_aid_inpaint_runs_an_operating_point(pair, tmp_path, capsys, tiny_checkpoint, tiny_guidance, method, nfe):
    import json

    img, mask = pair
    out = tmp_path / f"{method}.png"
    code, stdout, err = run_cli(["inpaint", img, "--mask", mask, "-o", out, "--model", tiny_checkpoint, "--guidance",
                                 tiny_guidance, "--method", method, "--json", "--quiet"], capsys)
    assert code == 0, err
    rec = json.loads(stdout)
    assert (rec["method"], rec["steps"], rec["nfe"]) == (method, int(method[-2:]), nfe)
    assert rec["params"]["guidance"] == str(tiny_guidance.resolve()) and out.is_file()
    known = np.asarray(Image.open(mask).convert("L")) < 128
    assert (np.asarray(Image.open(out))[known] == np.asarray(Image.open(img))[known]).all()


@pytest.mark.parametrize("args,phrase", [
    (["--method", "aid-12", "--steps", "18"], "--method aid-12 runs N = 12 steps, but --steps 18 was given"),
    (["--method", "dsp"], "did you mean dps?"),
    (["--method", "dps", "--guidance", "g.safetensors"], "--method dps takes none"),
    (["--method", "aid-18:aid-cats64-guidance", "--guidance", "g.safetensors"], "names its guidance module already"),
    (["--method", "aid-18:nope"], "no guidance module named 'nope'"),
    (["--method", "dps:x"], "only AID takes a guidance variant"),
])
def test_aid_inpaint_refuses_a_bad_method_in_one_line_before_loading(pair, tmp_path, capsys, args, phrase):
    img, mask = pair
    code, out, err = run_cli(["inpaint", img, "--mask", mask, "-o", tmp_path / "o.png", "--model",
                              tmp_path / "never-loaded.safetensors", *args], capsys)
    assert code == 2 and out == "" and err.count("\n") == 1 and err.startswith("error: ") and phrase in err, err
    assert not (tmp_path / "o.png").exists()


def test_aid_18_name_is_the_catalogue_s_guidance_module(pair, tmp_path, capsys, tiny_checkpoint):
    """aid-18:NAME takes NAME from `aid models list`: the shipped module, checked against the backbone it runs on (the
    tiny one here, which it was not trained for: one line)."""
    img, mask = pair
    code, out, err = run_cli(["inpaint", img, "--mask", mask, "-o", tmp_path / "o.png", "--model", tiny_checkpoint,
                              "--method", "aid-18:aid-cats64-guidance"], capsys)
    assert code == 2 and err.startswith("error: ") and "aid-cats64-guidance" in err and "backbone" in err, err
    assert not (tmp_path / "o.png").exists()
