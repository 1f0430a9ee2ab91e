"""How the backbone runs: `--precision`, `--compile` (devices.prepare_backbone) and batched `aid inpaint`, on CPU.

The CUDA paths (the official float16 path, fp16/bf16 autocast on a GPU) need a GPU and are checked on one by hand; see
README.md for the numbers.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from aid_cli import devices
from aid_cli.backbones.edm import build_precond
from aid_cli.devices import check_precision, prepare_backbone
from aid_cli.errors import UserError

from .conftest import TINY_KWARGS, run_cli

CPU = torch.device("cpu")


@pytest.fixture
def busy_net():
    """The tiny network with every weight perturbed (its output layer starts at zero), so precision shows."""
    torch.manual_seed(0)
    net = build_precond("EDMPrecond", dict(TINY_KWARGS)).eval().requires_grad_(False)
    for p in net.parameters():
        p.add_(0.05 * torch.randn_like(p))
    return net


def inputs(batch: int = 2):
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, 3, 16, 16, generator=g), torch.full((batch,), 1.5)


def test_fp32_and_auto_run_the_network_itself_in_channels_last(busy_net):
    x, sigma = inputs()
    ref = busy_net(x, sigma, None)
    assert prepare_backbone(busy_net, CPU) is busy_net
    assert prepare_backbone(busy_net, CPU, "fp32") is busy_net
    convs = [p for p in busy_net.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    out = busy_net(x, sigma, None)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5)  # NHWC only changes the summation order


def test_channels_last_can_be_turned_off(busy_net):
    prepare_backbone(busy_net, CPU, channels_last=False)
    assert all(p.is_contiguous() for p in busy_net.parameters())


def test_fp16_on_cpu_is_refused():
    with pytest.raises(UserError, match="fp16 needs a GPU"):
        check_precision("fp16", CPU)
    with pytest.raises(UserError, match="must be one of"):
        check_precision("fp8", CPU)


def test_bf16_autocast_on_cpu_gives_float32_close_to_fp32(busy_net):
    if not devices._autocast_runs(CPU, torch.bfloat16):
        pytest.skip("this torch has no bfloat16 autocast on CPU")
    x, sigma = inputs()
    ref = busy_net(x, sigma, None)
    out = prepare_backbone(busy_net, CPU, "bf16")(x, sigma, None)
    assert out.dtype == torch.float32
    err = (out - ref).abs().max().item()
    assert 0 < err < 0.05 * ref.abs().max().item()  # bfloat16 did run, and is close


def test_fp32_turns_off_a_checkpoint_float16_flag(busy_net):
    busy_net.use_fp16 = True
    prepare_backbone(busy_net, CPU, "fp32")
    assert busy_net.use_fp16 is False


@pytest.mark.skipif(not hasattr(torch, "compile"), reason="torch.compile is unavailable")
def test_compile_gives_the_same_output(busy_net, monkeypatch):
    monkeypatch.setattr(devices, "COMPILE_BACKEND", "eager")  # dynamo's graph capture without minutes of codegen
    x, sigma = inputs()
    notes = []
    out = prepare_backbone(busy_net, CPU, "fp32", compile=True, notice=notes.append)(x, sigma, None)
    assert torch.allclose(out, busy_net(x, sigma, None), atol=1e-6) and notes == []


@pytest.mark.skipif(not hasattr(torch, "compile"), reason="torch.compile is unavailable")
def test_compile_failure_falls_back_with_one_notice(busy_net, monkeypatch):
    def broken_backend(graph, example_inputs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(devices, "COMPILE_BACKEND", broken_backend)
    x, sigma = inputs()
    notes = []
    net = prepare_backbone(busy_net, CPU, "fp32", compile=True, notice=notes.append)
    for _ in range(2):
        assert torch.equal(net(x, sigma, None), busy_net(x, sigma, None))
    assert len(notes) == 1 and "running without it" in notes[0] and "no C++ compiler found" in notes[0]


def test_cli_precision_fp16_on_cpu_is_one_line(tiny_checkpoint, tmp_path, capsys):
    image, mask = _pair(tmp_path, "a", 0)
    code, out, err = run_cli(["inpaint", image, "--mask", mask, "-o", tmp_path / "o.png", "--model", tiny_checkpoint,
                              "--device", "cpu", "--precision", "fp16"], capsys)
    assert code == 2 and err.strip() == "error: --precision fp16 needs a GPU (--device cuda or mps); on CPU use fp32 or " \
                                        "bf16"
    assert not (tmp_path / "o.png").exists()


def _pair(folder, stem: str, seed: int, size=(40, 28)):
    rng = np.random.default_rng(seed)
    w, h = size
    image, mask = folder / f"{stem}.png", folder / f"{stem}_mask.png"
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(image)
    hole = np.zeros((h, w), np.uint8)
    hole[5 + seed:15 + seed, 8:20] = 255
    Image.fromarray(hole).save(mask)
    return image, mask


def test_batched_inpainting_equals_one_image_at_a_time(tiny_checkpoint, tmp_path, capsys):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    for i, stem in enumerate(["a", "b", "c"]):
        image, mask = _pair(tmp_path, stem, i, size=(40 + 8 * i, 28))
        image.rename(images / image.name)
        mask.rename(masks / f"{stem}.png")
    results = {}
    for batch in (1, 2):
        out = tmp_path / f"out{batch}"
        code, _, err = run_cli(["inpaint", images, "--mask", masks, "-o", out, "--model", tiny_checkpoint, "--device",
                                "cpu", "--steps", "3", "--samples", "2", "--batch", str(batch)], capsys)
        assert code == 0, err
        results[batch] = {p.name: np.asarray(Image.open(p)).astype(int) for p in sorted(out.iterdir())}
    assert sorted(results[1]) == ["a-0.png", "a-1.png", "b-0.png", "b-1.png", "c-0.png", "c-1.png"]
    assert results[1].keys() == results[2].keys()
    for name in results[1]:  # the same noise per sample whatever the batch (kernels may round differently: ≤ 1 level)
        assert np.abs(results[1][name] - results[2][name]).max() <= 1, name
    assert not np.array_equal(results[1]["a-0.png"], results[1]["a-1.png"])
