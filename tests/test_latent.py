"""The latent path (EDM2 + the SD VAE, method.md §11) on a tiny random EDM2 net and a tiny random AutoencoderKL:
EDM2's scaling, the pixel → latent mask rule, an observation that never sees hidden pixels, `aid inpaint` and
`aid bench` end to end with every visible pixel exact, `--class`, and one-line errors (no diffusers, no VAE offline)."""

from __future__ import annotations

import json
import sys
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from aid_cli.backbones.checkpoint import save_backbone
from aid_cli.fileio import sha256_file
from aid_cli.backbones.edm2 import build_precond
from aid_cli.backbones import vae as vae_mod
from aid_cli.backbones.spaces import LatentSpace, PixelSpace
from aid_cli.backbones.vae import RAW_MEAN, RAW_STD, VAE_REPO, check_encoder, stability_encoder
from aid_cli.bench import BenchConfig, run_bench
from aid_cli.errors import CheckpointError, UserError
from aid_cli.methods import METHODS, get_method
from aid_cli.sampling.heun import sample, sample_generators

from .conftest import method_params, run_cli
from .test_cli_inpaint import assert_user_error

diffusers = pytest.importorskip("diffusers", reason='the latent path needs diffusers: pip install "aid-inpaint[latent]"')

LATENT_RES = 8  # the tiny net's grid; the tiny VAE downsamples 8x like the SD VAE, so images are 64x64
PIXELS = 8 * LATENT_RES
NET_KWARGS = dict(img_resolution=LATENT_RES, img_channels=4, label_dim=0, model_channels=16, channel_mult=[1, 2],
                  num_blocks=1, attn_resolutions=[4], use_fp16=False)


def tiny_vae():
    """A randomly initialised AutoencoderKL with the SD VAE's layout (4 latent channels, 8x) but 8 channels wide."""
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                                   down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                                   block_out_channels=[8, 8, 8, 8], norm_num_groups=4, sample_size=PIXELS).eval()


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae")
    tiny_vae().save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No test reaches the hub: offline, with an empty Hugging Face cache and aid cache."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("AID_CACHE", str(tmp_path / "aid-cache"))


def latent_checkpoint(path, label_dim=0, seed=0):
    torch.manual_seed(seed)
    kwargs = dict(NET_KWARGS, label_dim=label_dim)
    net = build_precond("Precond", kwargs)
    with torch.no_grad():  # the official init has zero gains (an untrained net outputs D = c_skip·x): make it work
        for name, p in net.named_parameters():
            if name.endswith("gain"):
                p.fill_(0.5)
    save_backbone(path, net, "Precond", kwargs, provenance={"note": "random test weights"},
                  encoder=stability_encoder())
    return path


@pytest.fixture
def space():
    return LatentSpace(tiny_vae(), stability_encoder(), source="tiny")


# ------------------------------------------------------------------------------------------------------- the space


def test_edm2_latent_constants():
    enc = stability_encoder()
    assert enc["vae_name"] == VAE_REPO == "stabilityai/sd-vae-ft-mse"
    np.testing.assert_allclose(enc["scale"], 0.5 / np.array(RAW_STD), rtol=1e-6)
    np.testing.assert_allclose(enc["bias"], -np.array(RAW_MEAN) * 0.5 / np.array(RAW_STD), rtol=1e-6)
    assert RAW_MEAN == (5.81, 3.25, 0.12, -2.15) and RAW_STD == (4.17, 4.62, 3.71, 3.28)  # method.md §11
    check_encoder(enc, 4)
    with pytest.raises(ValueError):
        check_encoder(enc, 3)


def test_encode_and_decode_are_the_vae_with_edm2_scaling(space):
    torch.manual_seed(1)
    x = torch.rand(2, 3, PIXELS, PIXELS) * 2 - 1
    scale, bias = torch.tensor(space.encoder["scale"]).view(1, 4, 1, 1), torch.tensor(space.encoder["bias"]).view(1, 4, 1, 1)
    with torch.no_grad():
        mean = space.vae.encode((x + 1) / 2).latent_dist.mean  # the VAE takes [0, 1] pixels (EDM2's convention)
        z = space.encode(x)
        assert z.shape == (2, 4, LATENT_RES, LATENT_RES)
        torch.testing.assert_close(z, mean * scale + bias)  # z = (raw − raw_mean) · 0.5 / raw_std
        ref = space.vae.decode((z - bias) / scale).sample.clamp(0, 1) * 2 - 1
        torch.testing.assert_close(space.decode(z), ref)


def test_latent_mask_is_conservative(space):
    M = torch.ones(1, 1, PIXELS, PIXELS)
    M[..., 3, 4] = 0  # one hole pixel in latent cell (0, 0)
    M[..., 16:32, 40:48] = 0  # latent cells (2, 5) and (3, 5) entirely
    expected = torch.ones(1, 1, LATENT_RES, LATENT_RES)
    expected[..., 0, 0] = expected[..., 2, 5] = expected[..., 3, 5] = 0
    assert torch.equal(space.latent_mask(M), expected)
    with pytest.raises(ValueError):
        space.latent_mask(torch.ones(1, 1, 60, 60))


def test_observation_never_sees_the_hidden_pixels(space):
    torch.manual_seed(2)
    x = torch.rand(1, 3, PIXELS, PIXELS) * 2 - 1
    M = torch.ones(1, 1, PIXELS, PIXELS)
    M[..., 20:44, 10:30] = 0
    other = torch.where(M > 0, x, -x)  # the same image but for the hole
    a, b = space.task(x, M), space.task(other, M)
    assert torch.equal(a.y, b.y) and torch.equal(a.M, b.M)
    assert a.y.shape == (1, 4, LATENT_RES, LATENT_RES) and a.M.shape == (1, 1, LATENT_RES, LATENT_RES)


def test_oracles_run_on_pixels(space):
    assert isinstance(space.for_method(get_method("copy")), PixelSpace)
    assert isinstance(space.for_method(get_method("greyfill")), PixelSpace)
    assert space.for_method(get_method("replace")) is space


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_runs_on_the_latent_grid_and_keeps_visible_pixels(name, space):
    torch.manual_seed(3)
    net = build_precond("Precond", NET_KWARGS).eval().requires_grad_(False)
    x = torch.rand(2, 3, PIXELS, PIXELS) * 2 - 1
    M = torch.ones(2, 1, PIXELS, PIXELS)
    M[..., 12:40, 20:52] = 0
    params = method_params(name)
    if name == "aid":  # the actor acts on the latent state: 4 channels
        from aid_cli.guidance.networks import Actor

        params = {"actor": Actor(channels=4, width=8)}
    method = get_method(name, **params)
    s = space.for_method(method)
    task = s.task(x, M)
    result = sample(net, task, method, num_steps=2, generators=sample_generators(0, 2), extras={"x0": x})
    completed = s.to_pixels(x, M, result.completed)
    assert completed.shape == x.shape and torch.isfinite(completed).all()
    vis = M.expand_as(x) > 0.5
    assert torch.equal(completed[vis], x[vis])
    if method.oracle:
        assert result.nfe == 0 and task.y.shape == x.shape
    else:
        assert task.y.shape == (2, 4, LATENT_RES, LATENT_RES) and result.nfe >= 3


# -------------------------------------------------------------------------------------------------- aid inpaint


def _scene(tmp_path, w=97, h=80):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    hole = np.zeros((h, w), dtype=bool)
    hole[30:50, 40:61] = True
    Image.fromarray(pixels).save(tmp_path / "img.png")
    Image.fromarray((hole * 255).astype(np.uint8)).save(tmp_path / "mask.png")
    return pixels, hole


def test_inpaint_on_a_latent_backbone_keeps_visible_pixels_exact(tmp_path, vae_dir, capsys):
    ckpt = latent_checkpoint(tmp_path / "edm2.safetensors")
    pixels, hole = _scene(tmp_path)
    for fit in ("crop", "resize"):
        out = tmp_path / f"out-{fit}.png"
        code, stdout, err = run_cli(["inpaint", tmp_path / "img.png", "--mask", tmp_path / "mask.png", "-o", out,
                                     "--model", ckpt, "--vae", vae_dir, "--method", "replace", "--steps", "2",
                                     "--device", "cpu", "--fit", fit, "--samples", "2", "--json"], capsys)
        assert code == 0, err
        records = [json.loads(line) for line in stdout.splitlines()]
        assert len(records) == 2 and all(r["space"].startswith("latent") and r["nfe"] == 3 for r in records)
        assert records[0]["class"] is None
        for k in range(2):
            result = np.asarray(Image.open(out.with_name(f"{out.stem}-{k}.png")))
            assert result.shape == pixels.shape
            assert np.array_equal(result[~hole], pixels[~hole])  # every visible pixel exact
            assert not np.array_equal(result[hole], pixels[hole])  # the hole was filled


def test_class_option(tmp_path, vae_dir, capsys):
    cond = latent_checkpoint(tmp_path / "cond.safetensors", label_dim=3)
    uncond = latent_checkpoint(tmp_path / "uncond.safetensors")
    _scene(tmp_path)
    args = ["inpaint", tmp_path / "img.png", "--mask", tmp_path / "mask.png", "--steps", "2", "--device", "cpu",
            "--vae", vae_dir, "--method", "unguided"]
    code, stdout, err = run_cli(args + ["-o", tmp_path / "a.png", "--model", cond], capsys)
    assert_user_error(code, stdout, err, "class-conditional (3 classes)", "--class")
    code, stdout, err = run_cli(args + ["-o", tmp_path / "a.png", "--model", cond, "--class", "3"], capsys)
    assert_user_error(code, stdout, err, "--class 3", "0..2")
    code, stdout, err = run_cli(args + ["-o", tmp_path / "a.png", "--model", uncond, "--class", "1"], capsys)
    assert_user_error(code, stdout, err, "unconditional")
    outs = {}
    for c in (0, 2):
        out = tmp_path / f"c{c}.png"
        code, stdout, err = run_cli(args + ["-o", out, "--model", cond, "--class", str(c), "--json"], capsys)
        assert code == 0, err
        assert json.loads(stdout)["class"] == c
        outs[c] = np.asarray(Image.open(out))
    assert not np.array_equal(outs[0], outs[2])  # the label reaches the network
    assert not (tmp_path / "a.png").exists()


def test_missing_diffusers_is_one_line(tmp_path, capsys, monkeypatch):
    ckpt = latent_checkpoint(tmp_path / "edm2.safetensors")
    _scene(tmp_path)
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers → ImportError
    code, stdout, err = run_cli(["inpaint", tmp_path / "img.png", "--mask", tmp_path / "mask.png", "-o",
                                 tmp_path / "o.png", "--model", ckpt, "--device", "cpu"], capsys)
    assert_user_error(code, stdout, err, 'pip install "aid-inpaint[latent]"')


def test_vae_offline_and_not_cached_is_one_line_and_fast(tmp_path, capsys, monkeypatch):
    import time

    ckpt = latent_checkpoint(tmp_path / "edm2.safetensors")
    _scene(tmp_path)
    args = ["inpaint", tmp_path / "img.png", "--mask", tmp_path / "mask.png", "-o", tmp_path / "o.png", "--model",
            ckpt, "--device", "cpu"]
    t0 = time.perf_counter()
    code, stdout, err = run_cli(args, capsys)  # HF_HUB_OFFLINE=1, empty cache
    assert_user_error(code, stdout, err, VAE_REPO, "HF_HUB_OFFLINE", "hf download", "--vae DIR")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(vae_mod, "_hub_reachable", lambda timeout=3.0: False)  # no network
    code, stdout, err = run_cli(args, capsys)
    assert_user_error(code, stdout, err, VAE_REPO, "cannot be reached", "hf download", "--vae DIR")
    assert time.perf_counter() - t0 < 10
    assert not (tmp_path / "o.png").exists()
    code, stdout, err = run_cli(["inpaint", tmp_path / "img.png", "--mask", tmp_path / "mask.png", "-o",
                                 tmp_path / "o.png", "--model", ckpt, "--device", "cpu", "--vae", tmp_path], capsys)
    assert_user_error(code, stdout, err, "not a diffusers AutoencoderKL folder")


def test_vae_download_is_pinned_and_checked(tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_download(repo, filename, revision=None, local_files_only=False, **kw):
        calls.append((repo, filename, revision))
        path = tmp_path / "snapshot" / filename
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"{}" if filename.endswith(".json") else b"not the real weights")
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    with pytest.raises(CheckpointError, match="sha256"):
        vae_mod.fetch_vae(VAE_REPO)
    assert {c[2] for c in calls} == {vae_mod.VAE_REVISION} and {c[0] for c in calls} == {VAE_REPO}
    with pytest.raises(UserError, match="pinned revision"):
        vae_mod.fetch_vae("someone/else-vae")


def test_vae_on_a_pixel_backbone_is_refused(tmp_path, tiny_checkpoint, vae_dir, capsys):
    _scene(tmp_path)
    code, stdout, err = run_cli(["inpaint", tmp_path / "img.png", "--mask", tmp_path / "mask.png", "-o",
                                 tmp_path / "o.png", "--model", tiny_checkpoint, "--vae", vae_dir], capsys)
    assert_user_error(code, stdout, err, "works on pixels")


# ---------------------------------------------------------------------------------------------------- aid bench


def _labelled_zip(path, n=2, labels=(2, 0)):
    rng = np.random.default_rng(1)
    with zipfile.ZipFile(path, "w") as z:
        names = []
        for i in range(n):
            name = f"00000/img{i:08d}.png"
            from io import BytesIO

            buf = BytesIO()
            Image.fromarray(rng.integers(0, 256, (PIXELS, PIXELS, 3), dtype=np.uint8)).save(buf, format="PNG")
            z.writestr(name, buf.getvalue())
            names.append(name)
        z.writestr("dataset.json", json.dumps({"labels": [[n_, int(c)] for n_, c in zip(names, labels)]}))
    return path


def test_bench_runs_every_method_on_a_latent_class_conditional_backbone(tmp_path, vae_dir):
    from aid_cli.guidance.checkpoint import save_guidance
    from aid_cli.guidance.networks import Actor

    ckpt = latent_checkpoint(tmp_path / "cond.safetensors", label_dim=3)
    data = _labelled_zip(tmp_path / "data.zip")
    torch.manual_seed(0)
    guidance = save_guidance(tmp_path / "g.safetensors", Actor(channels=4, width=8), {"channels": 4, "width": 8},
                             sha256_file(ckpt))
    names = sorted(METHODS)
    cfg = BenchConfig(dataset=str(data), methods=names, masks=["center"], n=2, seeds=[0], steps=2, batch=2,
                      guidance=str(guidance), vae=str(vae_dir), lpips_offline=True)
    result = run_bench(cfg, tmp_path / "out", model=ckpt, device="cpu", log=lambda m: None)
    rows = {r["method"]: r for r in result["rows"]}
    assert list(rows) == names  # the bench itself checks every completion's visible pixels are exact
    assert rows["copy"]["psnr_hole"]["mean"] is None and rows["copy"]["nfe"] == 0  # exact ground truth on pixels
    assert rows["replace"]["nfe"] == 3
    model = result["config"]["model"]
    assert model["resolution"] == PIXELS and model["space"].startswith("latent") and model["class"] == "dataset.json"

    cfg = BenchConfig(dataset=str(tmp_path / "data.zip"), methods=["replace"], masks=["center"], n=2, seeds=[0],
                      steps=2, batch=2, vae=str(vae_dir), class_label=1, lpips_offline=True)
    result = run_bench(cfg, tmp_path / "out1", model=ckpt, device="cpu", log=lambda m: None)
    assert result["config"]["model"]["class"] == 1


def test_bench_needs_labels_for_a_class_conditional_backbone(tmp_path, vae_dir, capsys):
    ckpt = latent_checkpoint(tmp_path / "cond.safetensors", label_dim=3)
    folder = tmp_path / "plain"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(np.full((PIXELS, PIXELS, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    code, stdout, err = run_cli(["bench", "--methods", "replace", "--dataset", folder, "--model", ckpt, "--vae",
                                 vae_dir, "--n", "2", "--seeds", "1", "--steps", "2", "--masks", "center", "--out",
                                 tmp_path / "out", "--device", "cpu"], capsys)
    assert_user_error(code, stdout, err, "no dataset.json labels", "--class")
    code, stdout, err = run_cli(["bench", "--methods", "replace", "--dataset", _labelled_zip(tmp_path / "bad.zip",
                                 labels=(0, 7)), "--model", ckpt, "--vae", vae_dir, "--n", "2", "--seeds", "1",
                                 "--steps", "2", "--masks", "center", "--out", tmp_path / "out", "--device", "cpu"],
                                capsys)
    assert_user_error(code, stdout, err, "outside the backbone's classes")


@pytest.mark.parametrize("estimator", ["pathwise", "backprop"])
def test_train_on_a_latent_class_conditional_backbone(estimator, tmp_path, vae_dir, capsys):
    """aid train runs on latents: a 4-channel actor, the task on the latent grid, validation PSNR on pixels, labels
    from dataset.json; the module then serves aid inpaint/bench on that backbone."""
    from safetensors.torch import load_file

    from aid_cli.guidance.checkpoint import load_guidance

    ckpt = latent_checkpoint(tmp_path / "cond.safetensors", label_dim=3)
    data = _labelled_zip(tmp_path / "data.zip", n=4, labels=(2, 0, 1, 1))
    run = tmp_path / "run"
    code, _, err = run_cli(["train", "--dataset", data, "--val", data, "--val-n", "2", "--val-offset", "0", "--val-every", "2",
                            "--out", run,
                            "--backbone", ckpt, "--vae", vae_dir, "--steps", "2", "--batch", "2", "--iters", "2",
                            "--width", "8", "--estimator", estimator, "--checkpoint-every", "2", "--device", "cpu"],
                           capsys)
    assert code == 0, err
    stats = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    assert [s["iteration"] for s in stats] == [0, 1, 2] and np.isfinite(stats[-1]["val_psnr_hole_18"])
    assert json.loads((run / "config.json").read_text())["lambda_vis"] == 1.0  # the paper's latent value
    actor, info = load_guidance(run / "guidance.safetensors", backbone_sha256=sha256_file(ckpt))
    assert info["actor"]["channels"] == 4 and actor.out.weight.shape[0] == 4
    assert load_file(str(run / "training-state.safetensors"))["actor.out.weight"].abs().sum() > 0
    cfg = BenchConfig(dataset=str(data), methods=["aid-18"], masks=["center"], n=2, seeds=[0], steps=2, batch=2,
                      guidance=str(run / "guidance.safetensors"), vae=str(vae_dir), lpips_offline=True)
    assert run_bench(cfg, tmp_path / "b", model=ckpt, device="cpu", log=lambda m: None)["rows"][0]["nfe"] == 35


def test_train_needs_labels_for_a_class_conditional_latent_backbone(tmp_path, vae_dir, capsys):
    ckpt = latent_checkpoint(tmp_path / "cond.safetensors", label_dim=3)
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(np.zeros((PIXELS, PIXELS, 3), np.uint8)).save(folder / "a.png")
    code, stdout, err = run_cli(["train", "--dataset", folder, "--out", tmp_path / "run", "--backbone", ckpt, "--vae",
                                 vae_dir, "--device", "cpu"], capsys)
    assert_user_error(code, stdout, err, "no dataset.json labels", "--class")
    assert not (tmp_path / "run" / "guidance.safetensors").exists()
