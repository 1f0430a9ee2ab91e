"""Shared test helpers: where ../shared is, and tiny networks that make tests fast."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported: idle OpenMP threads sleep

import pytest  # noqa: E402
import torch  # noqa: E402

from aid_cli.backbones.edm import build_precond  # noqa: E402

# torch's threads, pinned for the whole suite: AID_TEST_THREADS, else OMP_NUM_THREADS, else 2 (at most 2: the tests'
# networks are tiny, and more threads on a shared machine only spin). Every test starts with this count again, since
# an in-process `aid ... --threads N` changes it for the rest of the process. The suite passes with 1 and with 2.
TEST_THREADS = max(1, min(2, int(os.environ.get("AID_TEST_THREADS") or os.environ.get("OMP_NUM_THREADS") or 2)))
torch.set_num_threads(TEST_THREADS)


def pytest_configure(config):
    config.addinivalue_line("markers", "real_inception: a bench test that runs FID's real Inception network (the "
                                       "others get a cheap stand-in, tests/test_bench.py)")


@pytest.fixture(autouse=True)
def _pinned_threads():
    torch.set_num_threads(TEST_THREADS)
    yield

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
FIXTURES = SHARED / "fixtures"


def need_shared(*parts: str) -> Path:
    """Path under ../shared, or skip the test (users do not have ../shared)."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs ../shared/{'/'.join(parts)} (project fixtures, not shipped to users)")
    return path


def load_fixture_net(family: str, case: str, build):
    """(net with the official state dict, meta.json, folder) of ../shared/fixtures/FAMILY/CASE (skips without it)."""
    import json

    from safetensors.torch import load_file

    folder = need_shared("fixtures", family, case)
    meta = json.loads((folder / "meta.json").read_text())
    net = build(meta["precond"], meta["init_kwargs"]).eval()
    net.load_state_dict(load_file(str(folder / "state_dict.safetensors")), strict=True)
    return net, meta, folder


def random_images(folder: Path, n: int, res: int = 16, prefix: str = "", seed: int = 0) -> Path:
    """A new folder of n random RGB res×res PNGs, PREFIX0.png, PREFIX1.png, … (uniform noise from `seed`)."""
    import numpy as np
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (res, res, 3), dtype=np.uint8)).save(folder / f"{prefix}{i}.png")
    return folder


def run_cli(args, capsys) -> tuple[int, str, str]:
    """Run `aid ARGS` in-process; returns (exit code, stdout, stderr). A normal return is exit code 0."""
    from aid_cli import cli

    capsys.readouterr()  # drop anything printed before
    try:
        cli.main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


TINY_KWARGS = dict(img_resolution=16, img_channels=3, label_dim=0, use_fp16=False, model_type="SongUNet",
                   embedding_type="positional", encoder_type="standard", decoder_type="standard", channel_mult_noise=1,
                   resample_filter=[1, 1], model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8],
                   dropout=0.0, augment_dim=0)


@pytest.fixture
def tiny_net():
    """A randomly initialised 16×16 EDM network (fast on CPU)."""
    torch.manual_seed(0)
    return build_precond("EDMPrecond", dict(TINY_KWARGS)).eval().requires_grad_(False)


@pytest.fixture
def tiny_checkpoint(tmp_path, tiny_net):
    from aid_cli.backbones.checkpoint import save_backbone

    path = tmp_path / "tiny.safetensors"
    save_backbone(path, tiny_net, "EDMPrecond", dict(TINY_KWARGS), provenance={"note": "random test weights"})
    return path


def method_params(name: str) -> dict:
    """Constructor arguments that let any registered method run on a tiny test network without shipped weights."""
    if name == "aid":  # a random (non-zero) actor instead of a trained guidance module
        from aid_cli.guidance.networks import Actor

        torch.manual_seed(0)
        actor = Actor(width=8)
        torch.nn.init.normal_(actor.out.weight, std=0.05)
        return {"actor": actor}
    if name == "copaint":
        return {"adaptive": False}  # no line search: the NFE count is exact
    if name == "vipaint":
        return {"iterations": 2, "particles": 2}  # a short fit (the default, 50 × 5, is tested in test_vipaint.py)
    return {}


def sigterm_at_call(monkeypatch, call: int) -> None:
    """Send this process SIGTERM from inside the `call`-th `GracefulStop.agreed` of a training loop, which the loop's
    handler turns into "finish this step, save, leave" (the way a scheduler or `timeout` stops a run)."""
    import os
    import signal

    from aid_cli import training

    calls = {"n": 0}
    original = training.GracefulStop.agreed

    def agreed(self, world, device):
        calls["n"] += 1
        if calls["n"] == call:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, world, device)

    monkeypatch.setattr(training.GracefulStop, "agreed", agreed)
