"""Progress: the sampler reports every network evaluation, each method knows its NFE in advance, and `aid inpaint`
shows a bar (NFE done / total) on a terminal only: nothing extra on a pipe, nothing at all with --quiet."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from aid_cli import cli
from aid_cli.methods import METHODS, get_method
from aid_cli.sampling.heun import sample

from .conftest import method_params, run_cli
from .test_methods import COUNTS, N
from .test_sampler import make_task


@pytest.mark.parametrize("name", sorted(METHODS))
def test_progress_reports_every_evaluation_and_expected_nfe_is_exact(tiny_net, name):
    task, x0 = make_task()
    method = get_method(name, **method_params(name))
    extras = {"x0": x0} if method.oracle else None
    told = []
    r = sample(tiny_net, task, method, num_steps=N, seed=0, extras=extras, progress=told.append)
    assert sum(told) == r.nfe == COUNTS[name][0], name
    assert method.expected_nfe(N) == r.nfe, name


def test_expected_nfe_of_the_defaults_at_18_steps():
    """The budgets the README states: 35 NFE for the plain loop and AID, 350 for RePaint, 71 (+ retries) for CoPaint,
    764 for VIPaint."""
    assert get_method("replace").expected_nfe(18) == 35
    assert get_method("repaint").expected_nfe(18) == 350
    assert get_method("copaint").expected_nfe(18) == 71
    assert get_method("vipaint").expected_nfe(18) == 764
    assert get_method("copy").expected_nfe(18) == 0


@pytest.fixture
def pair(tmp_path):
    rng = np.random.default_rng(0)
    image, mask = tmp_path / "photo.png", tmp_path / "mask.png"
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(image)
    hole = np.zeros((30, 40), np.uint8)
    hole[5:20, 10:30] = 255
    Image.fromarray(hole).save(mask)
    return image, mask


def args(pair, tiny_checkpoint, *extra):
    image, mask = pair
    return ["inpaint", image, "--mask", mask, "-o", image.with_name("out.png"), "--model", tiny_checkpoint,
            "--method", "repaint", "--steps", 3, "--device", "cpu", *extra]


def test_a_terminal_shows_the_nfe_bar(pair, tiny_checkpoint, capsys, monkeypatch):
    monkeypatch.setattr(cli.inpaint, "err", Console(stderr=True, highlight=False, soft_wrap=True, force_terminal=True,
                                            width=120))
    code, out, err = run_cli(args(pair, tiny_checkpoint), capsys)
    assert code == 0, err
    assert "repaint photo.png" in err and "/50" in err and "NFE" in err  # RePaint at N = 3: 10 × 5 NFE
    assert "wrote " in err and out == ""


def test_a_pipe_gets_no_bar_only_the_wrote_line(pair, tiny_checkpoint, capsys):
    code, out, err = run_cli(args(pair, tiny_checkpoint), capsys)
    assert code == 0, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wrote ") and "50 NFE" in lines[0]
    assert "\x1b" not in err and "\r" not in err


@pytest.mark.parametrize("flag", ["--quiet", "-q"])
def test_quiet_prints_nothing_on_a_terminal_but_json_still_prints(pair, tiny_checkpoint, capsys, monkeypatch, flag):
    monkeypatch.setattr(cli.inpaint, "err", Console(stderr=True, highlight=False, soft_wrap=True, force_terminal=True))
    code, out, err = run_cli(args(pair, tiny_checkpoint, flag, "--json"), capsys)
    assert code == 0 and err == "", err
    assert '"nfe": 50' in out
    assert pair[0].with_name("out.png").is_file()


# ------------------------------------------------------------------------------------------------- aid bench's plan

@pytest.mark.parametrize("name", sorted(METHODS))
def test_bench_counts_each_methods_evaluations_on_a_stand_in(name):
    from aid_cli.bench import count_evaluations
    from aid_cli.resolve import MethodSpec

    params = method_params(name)
    spec = MethodSpec(name, name, params={k: v for k, v in params.items() if k != "actor"}, steps=N,
                      runtime={"actor": params["actor"]} if "actor" in params else {})
    assert count_evaluations(spec, 3, 16) == COUNTS[name]


def test_bench_announces_its_plan_and_gets_a_numbered_folder(tmp_path, tiny_checkpoint, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("AID_RUNS", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(data / f"{i}.png")
    args = ["bench", "--methods", "replace,dps,copy", "--dataset", data, "--model", tiny_checkpoint, "--masks", "center",
            "--n", "2", "--seeds", "1", "--steps", "3", "--device", "cpu", "--offline"]
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    assert (tmp_path / "aid-runs" / "00000-bench-data" / "bench.json").is_file()
    plan = [line for line in err.splitlines() if line.startswith("plan:")]
    assert len(plan) == 1 and "3 cell(s) × 2 images" in plan[0] and "replace 5 NFE" in plan[0]
    assert "dps 5 NFE + 3 backward" in plan[0] and "copy 0 NFE" in plan[0] and "about " in plan[0]
    code, _, err = run_cli(args + ["--resume"], capsys)
    assert code == 2 and "need --out" in err
