"""Defaults a new user leans on: the method (aid where a guidance module for the backbone is at hand, else repaint, and
the `wrote` line says which), outputs without -o (beside the input, never over anything), several image arguments in
one call, and numbered run folders for `aid train` / `aid pretrain` without --out."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aid_cli.fileio import numbered_run_dir, run_description

from .conftest import REPO, run_cli

STEPS = 3


def write_pair(folder: Path, stem: str, size=(40, 30), seed=0) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    w, h = size
    rng = np.random.default_rng(seed)
    image = folder / f"{stem}.png"
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(image)
    hole = np.zeros((h, w), np.uint8)
    hole[8:20, 10:25] = 255
    mask = folder / f"{stem}_mask.png"
    Image.fromarray(hole).save(mask)
    return image, mask


def records(out: str) -> list[dict]:
    return [json.loads(line) for line in out.strip().splitlines()]


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------------- the default method

def test_default_method_is_aid_with_the_shipped_guidance_module(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "filled.png"
    code, stdout, err = run_cli(["inpaint", REPO / "examples" / "chelsea.png", "--mask",
                                 REPO / "examples" / "chelsea_mask.png", "-o", out, "--steps", STEPS, "--json"], capsys)
    assert code == 0, err
    (rec,) = records(stdout)
    assert rec["method"] == "aid" and rec["method_default"] is True
    assert Path(rec["params"]["guidance"]).name == "aid-cats64-guidance.safetensors"
    assert "(aid by default: aid-cats64-guidance is this backbone's guidance module;" in err
    assert out.is_file()


def test_default_method_without_a_guidance_module_is_repaint(tmp_path, tiny_checkpoint, capsys):
    image, mask = write_pair(tmp_path, "photo")
    code, stdout, err = run_cli(["inpaint", image, "--mask", mask, "--model", tiny_checkpoint, "--steps", STEPS,
                                 "--device", "cpu", "--json"], capsys)
    assert code == 0, err
    (rec,) = records(stdout)
    assert rec["method"] == "repaint" and rec["method_default"] is True
    assert "(repaint by default: no guidance module for this backbone" in err


def test_a_given_method_is_not_called_a_default(tmp_path, tiny_checkpoint, capsys):
    image, mask = write_pair(tmp_path, "photo")
    code, stdout, err = run_cli(["inpaint", image, "--mask", mask, "--model", tiny_checkpoint, "--steps", STEPS,
                                 "--device", "cpu", "--method", "replace", "--json"], capsys)
    assert code == 0, err
    assert records(stdout)[0]["method_default"] is False
    assert "(replace, 5 NFE" in err and "default" not in err


def test_guidance_for_another_backbone_is_refused_in_one_line(tmp_path, tiny_checkpoint, capsys):
    """--guidance alone implies --method aid; the shipped module belongs to the embedded backbone, not this one."""
    image, mask = write_pair(tmp_path, "photo")
    code, stdout, err = run_cli(["inpaint", image, "--mask", mask, "--model", tiny_checkpoint, "--steps", STEPS,
                                 "--device", "cpu", "--guidance", REPO / "weights" / "aid-cats64-guidance.safetensors"],
                                capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "trained on backbone" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photo.png", "photo_mask.png", "tiny.safetensors"]


# ------------------------------------------------------------------------------------------------- outputs without -o

def inpaint_args(*inputs, mask, model, extra=()):
    return ["inpaint", *inputs, "--mask", mask, "--model", model, "--method", "replace", "--steps", STEPS,
            "--device", "cpu", *extra]


def test_without_o_the_result_goes_beside_the_input_never_over_anything(tmp_path, tiny_checkpoint, capsys):
    image, mask = write_pair(tmp_path / "in", "photo")
    before = tree(tmp_path / "in")
    assert run_cli(inpaint_args(image, mask=mask, model=tiny_checkpoint), capsys)[0] == 0
    first = image.with_name("photo-filled.png")
    assert first.is_file() and tree(tmp_path / "in").keys() == before.keys() | {"photo-filled.png"}
    first_bytes = first.read_bytes()
    code, _, err = run_cli(inpaint_args(image, mask=mask, model=tiny_checkpoint, extra=["--seed", 1]), capsys)
    assert code == 0 and "wrote " + str(image.with_name("photo-filled-2.png")) in err, err
    assert first.read_bytes() == first_bytes  # the earlier result is untouched
    # K samples: every sample's file must be free, or the next number is taken
    image.with_name("photo-filled-3-1.png").write_bytes(b"someone else's file")
    assert run_cli(inpaint_args(image, mask=mask, model=tiny_checkpoint, extra=["--samples", 2]), capsys)[0] == 0
    assert image.with_name("photo-filled-3-1.png").read_bytes() == b"someone else's file"
    assert image.with_name("photo-filled-4-0.png").is_file() and image.with_name("photo-filled-4-1.png").is_file()
    for name, data in before.items():
        assert (tmp_path / "in" / name).read_bytes() == data


def test_jpeg_input_gets_a_png_result_without_o(tmp_path, tiny_checkpoint, capsys):
    image, mask = write_pair(tmp_path, "photo")
    jpg = tmp_path / "photo.jpg"
    Image.open(image).save(jpg, quality=90)
    assert run_cli(inpaint_args(jpg, mask=mask, model=tiny_checkpoint), capsys)[0] == 0
    assert (tmp_path / "photo-filled.png").is_file()


def test_a_folder_without_o_fills_a_new_folder_beside_it(tmp_path, tiny_checkpoint, capsys):
    for i, stem in enumerate(("cat", "dog")):
        write_pair(tmp_path / "photos", stem, seed=i)[1].unlink()
    _, mask = write_pair(tmp_path / "masks", "any")
    assert run_cli(inpaint_args(tmp_path / "photos", mask=mask, model=tiny_checkpoint), capsys)[0] == 0
    assert sorted(tree(tmp_path / "photos-filled")) == ["cat.png", "dog.png"]
    assert run_cli(inpaint_args(tmp_path / "photos", mask=mask, model=tiny_checkpoint), capsys)[0] == 0
    assert sorted(tree(tmp_path / "photos-filled-2")) == ["cat.png", "dog.png"]


# ------------------------------------------------------------------------------------------------- several images

def test_several_images_in_one_call(tmp_path, tiny_checkpoint, capsys):
    pairs = [write_pair(tmp_path / "in", stem, size=(40 + 8 * i, 30), seed=i) for i, stem in enumerate("abc")]
    masks = tmp_path / "in"  # paired by stem: a_mask.png, …
    out = tmp_path / "out"
    code, stdout, err = run_cli(inpaint_args(*[p[0] for p in pairs], mask=masks, model=tiny_checkpoint,
                                             extra=["-o", out, "--json", "--batch", 2]), capsys)
    assert code == 0, err
    assert sorted(tree(out)) == ["a.png", "b.png", "c.png"]
    assert [Path(r["input"]).name for r in records(stdout)] == ["a.png", "b.png", "c.png"]
    # the same results as one call per image (sample noise depends on the seed, not on the call)
    for image, mask in pairs:
        single = tmp_path / f"single-{image.name}"
        assert run_cli(inpaint_args(image, mask=mask, model=tiny_checkpoint, extra=["-o", single]), capsys)[0] == 0
        a = np.asarray(Image.open(single)).astype(int)
        b = np.asarray(Image.open(out / image.name)).astype(int)
        assert np.abs(a - b).max() <= 2
    # without -o: each beside its input; a glob that also names the masks (in the --mask folder) skips them
    everything = sorted((tmp_path / "in").glob("[ab]*.png"))
    assert [p.name for p in everything] == ["a.png", "a_mask.png", "b.png", "b_mask.png"]
    code, _, err = run_cli(inpaint_args(*everything, mask=masks, model=tiny_checkpoint), capsys)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "in").glob("*-filled*")) == ["a-filled.png", "b-filled.png"]


def test_one_image_into_a_folder(tmp_path, tiny_checkpoint, capsys):
    """`-o out/` for one image, as `xargs -I{} aid inpaint {} -o out/` runs it: the folder is made on the first call,
    and the next image goes into it (the same one again only with --overwrite)."""
    image, mask = write_pair(tmp_path, "photo")
    other, _ = write_pair(tmp_path, "other")
    for item, extra in ((image, []), (other, []), (image, ["--overwrite"])):
        code, _, err = run_cli(inpaint_args(item, mask=mask, model=tiny_checkpoint,
                                            extra=["-o", tmp_path / "out", *extra]), capsys)
        assert code == 0, err
    assert sorted(tree(tmp_path / "out")) == ["other.png", "photo.png"]
    code, _, err = run_cli(inpaint_args(image, mask=mask, model=tiny_checkpoint, extra=["-o", tmp_path / "o.xyz"]),
                           capsys)
    assert code == 2 and "cannot tell the output format" in err


@pytest.mark.parametrize("case", ["same stem twice", "same image twice", "o is a file", "one missing"])
def test_several_images_fail_before_any_output(tmp_path, tiny_checkpoint, capsys, case):
    a, mask = write_pair(tmp_path / "x", "photo")
    b, _ = write_pair(tmp_path / "y", "photo", seed=1)
    out = tmp_path / "out"
    inputs, phrase = {
        "same stem twice": ([a, b], "would both be written to"),
        "same image twice": ([a, a], "is given twice"),
        "o is a file": ([a, b], "-o must be a folder"),
        "one missing": ([a, tmp_path / "nope.png"], "image path not found"),
    }[case]
    if case == "o is a file":
        out = tmp_path / "x" / "photo_mask.png"
    before = tree(tmp_path)
    code, stdout, err = run_cli(inpaint_args(*inputs, mask=mask, model=tiny_checkpoint, extra=["-o", out]), capsys)
    assert code == 2 and stdout == "" and phrase in err and len(err.strip().splitlines()) == 1, err
    assert tree(tmp_path) == before


# ------------------------------------------------------------------------------------------------- numbered run folders

def test_numbered_run_dir_follows_edm(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert numbered_run_dir("train-x", tmp_path / "runs") == tmp_path / "runs" / "00000-train-x"
    (tmp_path / "runs" / "00000-train-x").mkdir(parents=True)
    (tmp_path / "runs" / "00007-other").mkdir()
    (tmp_path / "runs" / "notes").mkdir()
    (tmp_path / "runs" / "00042.txt").write_text("a file, not a run")
    assert numbered_run_dir("train-x", tmp_path / "runs") == tmp_path / "runs" / "00008-train-x"
    assert numbered_run_dir("a b/c", tmp_path / "runs").name == "00008-a-b-c"
    assert run_description("train", "../shared/data/cats64/train.zip") == "train-cats64-train"
    assert run_description("pretrain", "ffhq") == "pretrain-ffhq"
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(Exception, match="under torchrun, pass --out"):
        numbered_run_dir("train-x", tmp_path / "runs")


@pytest.mark.parametrize("command", ["train", "pretrain"])
def test_train_and_pretrain_without_out_get_a_numbered_run(tmp_path, tiny_checkpoint, capsys, monkeypatch, command):
    """The trainer itself is replaced by a stub that records where it was told to write (its options change often)."""
    from aid_cli import pretrain
    from aid_cli.guidance import trainer

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("AID_RUNS", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    data = tmp_path / "data"
    write_pair(data, "0")
    seen = []

    def stub(cfg, resume, device, log):
        seen.append(cfg.out)
        Path(cfg.out).mkdir(parents=True)
        return Path(cfg.out)

    monkeypatch.setattr(trainer if command == "train" else pretrain, command if command == "train" else "pretrain", stub)
    args = [command, "--dataset", data, "--device", "cpu"] + (["--backbone", tiny_checkpoint] if command == "train" else [])
    for _ in range(2):
        code, _, err = run_cli(args, capsys)
        assert code == 0, err
    assert seen == [f"aid-runs/00000-{command}-data", f"aid-runs/00001-{command}-data"]
    code, _, err = run_cli(args + ["--resume"], capsys)
    assert code == 2 and "--resume needs --out" in err


# ------------------------------------------------------------------------------------------------- portable provenance

def test_portable_record_keeps_no_absolute_paths(tmp_path):
    from aid_cli.fileio import portable_record

    run = tmp_path / "runs" / "00003-train-x"
    record = {"dataset": "/data/shared/cats64/train.zip", "out": str(run), "backbone": str(run / "net.safetensors"),
              "val_dataset": None, "init": "ffhq", "steps": 18, "note": "/not/a/path/key",
              "config": {"dataset": "../shared/data/cats64/val.zip", "out": str(run) + "/"}}
    assert portable_record(record, run) == {
        "dataset": "cats64/train.zip", "out": ".", "backbone": "net.safetensors", "val_dataset": None, "init": "ffhq",
        "steps": 18, "note": "/not/a/path/key", "config": {"dataset": "cats64/val.zip", "out": "."}}


def test_pretrain_snapshot_records_names_not_paths(tmp_path):
    import json as _json

    from aid_cli.backbones.checkpoint import read_metadata
    from aid_cli.pretrain import PretrainConfig, pretrain

    data = tmp_path / "data"
    for i in range(4):
        write_pair(data, str(i), size=(16, 16), seed=i)[1].unlink()
    run = tmp_path / "run"
    cfg = PretrainConfig(dataset=str(data), out=str(run), resolution=16, model_channels=16, channel_mult=[1, 2],
                         num_blocks=1, attn_resolutions=[8], batch=4, duration_kimg=0.004, snapshot_kimg=0.004,
                         checkpoint_minutes=60.0, seed=0)
    pretrain(cfg, resume=False, device=__import__("torch").device("cpu"), log=lambda *a: None)
    (snapshot,) = run.glob("network-snapshot-*.safetensors")
    meta = read_metadata(snapshot)
    text = _json.dumps(meta)
    assert str(tmp_path) not in text, text
    provenance = _json.loads(meta["aid.provenance"])
    assert provenance["config"]["out"] == "." and provenance["config"]["dataset"].endswith("data")


def test_shipped_weights_record_no_absolute_paths():
    """The embedded backbone and its guidance module say where they came from by names, not by the training machine's
    paths (and the module still names its backbone's sha256)."""
    import json as _json

    from aid_cli.backbones.checkpoint import read_metadata
    from aid_cli.fileio import sha256_file

    weights = REPO / "weights"
    backbone, guidance = weights / "aid-cats64-edm.safetensors", weights / "aid-cats64-guidance.safetensors"

    def strings(value):
        if isinstance(value, dict):
            for v in value.values():
                yield from strings(v)
        elif isinstance(value, list):
            for v in value:
                yield from strings(v)
        elif isinstance(value, str):
            yield value

    for path in (backbone, guidance, weights / "aid-cats64-edm.tuned.json", weights / "aid-cats64-edm.eval.json"):
        record = read_metadata(path) if path.suffix == ".safetensors" else _json.loads(path.read_text())
        values = []
        for v in strings(record):
            try:
                values += list(strings(_json.loads(v)))
            except ValueError:
                values.append(v)
        assert not [v for v in values if v.startswith(("/", "~"))], (path.name, values)
    assert read_metadata(guidance)["aid.backbone_sha256"] == sha256_file(backbone)


# ------------------------------------------------------------------------------------------- aid bench without --dataset

def test_bench_without_dataset_benchmarks_the_backbones_own_images(tmp_path, tiny_checkpoint, capsys, monkeypatch):
    """The mission's literal `aid bench --methods …`: no --dataset, no --out. The images are the backbone's own samples
    (seeds far from the fills' noise seeds), written once into the run folder and reused by --resume."""
    from aid_cli.backbones.checkpoint import load_backbone
    from aid_cli.backbones.evaluate import generate
    from aid_cli.bench import SAMPLES_SEED

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("AID_RUNS", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    args = ["bench", "--methods", "replace,unguided", "--model", tiny_checkpoint, "--steps", "3", "--n", "2",
            "--masks", "freeform", "--offline", "--device", "cpu"]
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    assert "no --dataset: drawing 2 images from the backbone itself" in err and "pass --dataset" in err
    out = tmp_path / "aid-runs" / "00000-bench-samples"
    images = sorted((out / "images").glob("*.png"))
    assert [p.name for p in images] == [f"sample-{SAMPLES_SEED}.png", f"sample-{SAMPLES_SEED + 1}.png"]
    net, info = load_backbone(tiny_checkpoint)
    expected = generate(net, 2, info["resolution"], steps=3, seed=SAMPLES_SEED)  # what the files must hold
    for p, x in zip(images, expected):
        assert np.array_equal(np.asarray(Image.open(p)), x.permute(1, 2, 0).numpy())
    result = json.loads((out / "bench.json").read_text())
    assert Path(result["config"]["dataset"]).resolve() == (out / "images").resolve()
    assert result["config"]["seeds"] == [0]  # one seed by default without --dataset
    before = {p.name: p.stat().st_mtime_ns for p in images}
    code, _, err = run_cli(args + ["--out", out, "--resume"], capsys)
    assert code == 0, err
    assert "no --dataset: drawing" not in err  # reused, not drawn again
    assert {p.name: p.stat().st_mtime_ns for p in sorted((out / "images").glob("*.png"))} == before


def test_bench_tune_without_dataset_is_one_line(tmp_path, tiny_checkpoint, capsys):
    code, _, err = run_cli(["bench", "--tune", "dps", "--model", tiny_checkpoint, "--device", "cpu"], capsys)
    assert code == 2 and "--tune needs --dataset" in err and "Traceback" not in err
