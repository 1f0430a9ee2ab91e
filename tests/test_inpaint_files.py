"""`aid_cli.inpaint_files`, the library call `aid inpaint` makes, and what a new user meets on the command line: paths
checked before torch loads, one overwrite rule, Ctrl-C saying what was written, and what the default model knows."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
from PIL import Image

import aid_cli
from aid_cli.models.catalogue import default_backbone

from .conftest import REPO, run_cli

FAST = ["--method", "replace", "--steps", "2"]


def _pair(folder, name="img", seed=0):
    rng = np.random.default_rng(seed)
    img, mask = folder / f"{name}.png", folder / f"{name}_mask.png"
    Image.fromarray(rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)).save(img)
    hole = np.zeros((24, 20), np.uint8)
    hole[6:14, 5:12] = 255
    Image.fromarray(hole).save(mask)
    return img, mask


def test_inpaint_files_is_the_library_call_of_aid_inpaint(tmp_path, tiny_checkpoint):
    img, mask = _pair(tmp_path)
    seen = []
    settings = aid_cli.InpaintSettings(model=tiny_checkpoint, method="replace", steps=2, samples=2)
    hooks = aid_cli.InpaintHooks(ready=lambda run: seen.append(run.method.name), written=seen.extend)
    records = aid_cli.inpaint_files([img], mask, tmp_path / "out.png", settings, hooks)
    assert [r["path"] for r in records] == [str(tmp_path / "out-0.png"), str(tmp_path / "out-1.png")]
    assert seen == ["replace", *records] and all(r["nfe"] == 3 and r["steps"] == 2 for r in records)
    assert [r["seed"] for r in records] == [0, 1] and (tmp_path / "out-1.png").is_file()


def test_a_missing_file_is_reported_before_torch_is_imported(tmp_path):
    code = ("import sys\nfrom aid_cli.cli import main\ntry:\n    main(['inpaint', 'missing.png', '--mask', 'm.png'])\n"
            "except SystemExit as e:\n    print(e.code, 'torch' in sys.modules, 'PIL' in sys.modules)\n")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.stdout.split() == ["2", "False", "False"], done.stdout + done.stderr
    assert done.stderr.strip() == "error: image path not found: missing.png"


def test_nothing_is_replaced_without_overwrite(tmp_path, capsys, tiny_checkpoint):
    """One rule: -o's outputs that exist are refused before any work unless --overwrite; the default names never
    take an existing file's."""
    img, mask = _pair(tmp_path)
    out = tmp_path / "filled"
    out.mkdir()
    (out / "img.png").write_bytes(b"an earlier result")
    args = ["inpaint", img, tmp_path / "other.png", "--mask", tmp_path, "-o", out, "--model", tiny_checkpoint, *FAST]
    _pair(tmp_path, "other", seed=1)
    code, stdout, err = run_cli(args, capsys)
    assert code == 2 and err.strip().splitlines() == [f"error: {out / 'img.png'} exists; pass --overwrite to replace, "
                                                      f"or choose another -o"], err
    assert sorted(p.name for p in out.iterdir()) == ["img.png"] and (out / "img.png").read_bytes() == b"an earlier result"
    code, stdout, err = run_cli([*args, "--overwrite"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["img.png", "other.png"]
    assert Image.open(out / "img.png").size == (20, 24)
    for expected in ("img-filled.png", "img-filled-2.png"):  # no -o: a new name each time
        code, stdout, err = run_cli(["inpaint", img, "--mask", mask, "--model", tiny_checkpoint, *FAST], capsys)
        assert code == 0 and f"wrote {tmp_path / expected} " in err, err
    code, stdout, err = run_cli(["inpaint", "--help"], capsys)
    assert "--overwrite" in stdout and "Nothing is ever replaced" in " ".join(re.sub(r"[│]", " ", stdout).split())


def test_ctrl_c_says_what_was_written_and_leaves_no_partial_file(tmp_path, capsys, tiny_checkpoint, monkeypatch):
    from aid_cli import fill

    images = tmp_path / "images"
    images.mkdir()
    for k, name in enumerate(("a", "b", "c")):
        _pair(images, name, seed=k)
    real, calls = fill.fill_items, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(fill, "fill_items", interrupted)
    out = tmp_path / "out"
    code, stdout, err = run_cli(["inpaint", images, "--mask", images, "-o", out, "--model", tiny_checkpoint, *FAST],
                                capsys)
    assert code == 130, err
    assert err.strip().splitlines()[-1] == (f"interrupted: 1 of 3 outputs written (the last: {out / 'a.png'}); the "
                                            f"other 2 were not, and no partial file is left")
    assert sorted(p.name for p in out.iterdir()) == ["a.png"]  # no temp file either


def test_help_and_the_wrote_line_say_what_the_default_model_knows(tmp_path, capsys):
    entry = default_backbone()
    assert entry.knows  # the catalogue says it; nothing in the CLI repeats it
    code, out, err = run_cli(["inpaint", "--help"], capsys)
    assert code == 0 and f"default: {entry.name}, which knows {entry.knows} only" in " ".join(
        re.sub(r"[│]", " ", out).split())
    img, mask = _pair(tmp_path)
    code, out, err = run_cli(["inpaint", img, "--mask", mask, "--json", *FAST], capsys)
    assert code == 0, err
    assert err.strip().startswith("wrote ") and err.strip().endswith(f"; {entry.name} knows {entry.knows})"), err
    assert json.loads(out)["nfe"] == 3
