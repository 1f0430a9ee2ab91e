"""The benchmark on whole photos: photos of any size, masks drawn at each photo's own scale (data/photo_masks.py), every
method through the path of `aid inpaint` (fill.fit_hole → fill_items: fit → complete → composite), metrics at full
resolution.

Photo i under noise seed s is filled as `aid inpaint --seed s·2²⁰ + i` fills it (one photo per call, as a user runs
it): the benchmark's fill and the command line's are the same pixels. Seconds per photo cover the whole middle of that
path (fitting, the method, compositing), not reading or writing files. Cells, resume, sharding and reports are the cat
benchmark's (runner.py, report.py).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ..data.datasets import load_photo_set
from ..data.images import LoadedImage, plan_native_crop, to_task_tensors
from ..data.photo_masks import PHOTO_MASKS_VERSION, describe_photo, photo_eval_hole
from ..errors import UserError
from ..fill import InpaintOptions, fill_items, fit_hole
from ..jobs import Job
from ..plots import save_labelled_grid, to_uint8
from .measure import PeakMemory
from .report import METRIC_DEFINITIONS, load_examples
from .runner import RUNNERS, SEED_STRIDE, Runner

TILE = 128  # grid tiles: the square box around the hole (plan_native_crop), shown at this size

PHOTO_METRIC_DEFINITIONS = dict(
    METRIC_DEFINITIONS,
    psnr_hole="10·log10(R²/MSE), MSE over the hole's pixels × channels of the completed photo at its own full "
              "resolution vs the original, [0, 1] with R = 1",
    ssim=METRIC_DEFINITIONS["ssim"] + "; on the hole's neighbourhood at full resolution (neighbourhood(): the hole's "
                                      "bounding box grown by a quarter of its longer side, at least 64x64, clipped to "
                                      "the photo)",
    lpips=METRIC_DEFINITIONS["lpips"] + "; on the hole's neighbourhood at full resolution (as SSIM)",
    lpips_vgg=METRIC_DEFINITIONS["lpips_vgg"] + "; on the hole's neighbourhood at full resolution (as SSIM)",
    fid="not computed on whole photos (null): a photo's visible pixels would dominate it",
    kid="not computed on whole photos (null), as fid",
    sec_per_image="wall-clock seconds per photo of fitting, the method and compositing (aid inpaint's path without "
                  "file I/O), one photo per call, after a discarded warm-up photo, the methods of one mask family "
                  "and seed run photo by photo in turn; mean over seeds",
)


def neighbourhood(hole: np.ndarray, margin: float = 0.25, at_least: int = 64) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the region SSIM and LPIPS see: the hole's bounding box grown by `margin` × its
    longer side on every side, widened to at least `at_least` px per axis where the photo allows, clipped to it."""
    height, width = hole.shape
    rows, cols = np.flatnonzero(hole.any(axis=1)), np.flatnonzero(hole.any(axis=0))
    top, bottom, left, right = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    grow = int(np.ceil(margin * max(bottom - top, right - left)))

    def axis(lo: int, hi: int, n: int) -> tuple[int, int]:
        lo, hi = lo - grow, hi + grow
        short = max(at_least - (hi - lo), 0)
        lo, hi = lo - short // 2, hi + short - short // 2
        if lo < 0:
            lo, hi = 0, hi - lo
        if hi > n:
            lo, hi = max(lo - (hi - n), 0), n
        return lo, hi

    top, bottom = axis(top, bottom, height)
    left, right = axis(left, right, width)
    return left, top, right, bottom


def _float(pixels: np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 → [1, 3, H, W] in [−1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)[None].to(torch.float32) / 127.5 - 1


class PhotoRunner(Runner):
    """A Runner whose images are whole photos, masks at their scale, and cells run through fill.fill_items."""

    masks_version = PHOTO_MASKS_VERSION
    metric_definitions = PHOTO_METRIC_DEFINITIONS

    def __init__(self, *args, fit: str = "auto", **kwargs):
        self.fit = fit
        kwargs["realism"] = False  # (original_features: none on whole photos yet)
        super().__init__(*args, **kwargs)

    def describe_mask(self, family: str) -> str:
        return describe_photo(family)

    def hole_fraction(self, family: str) -> float:
        return round(float(np.mean([h.mean() for h in self.holes[family]])), 4)

    def _load_data(self, dataset: str, n: int, families: list[str], mask_seed: int, class_label: int | None) -> None:
        if self.info.get("label_dim", 0):
            raise UserError("the photo benchmark runs unconditional backbones; this one is class-conditional")
        skipped = []
        self.data = load_photo_set(dataset, limit=n, offset=self.offset, on_skip=lambda name, why: skipped.append(name))
        if skipped:
            self.log(f"note: skipped {len(skipped)} unreadable image(s) of {dataset}, e.g. {skipped[0]}")
        if len(self.data) < n:
            after = f" after the first {self.offset}" if self.offset else ""
            raise UserError(f"--n {n}, but {dataset} has only {len(self.data)} readable photos{after}")
        self.class_label, self.labels = None, None
        self.holes = {f: [photo_eval_hole(f, mask_seed, i, tuple(p.shape[1:])) for i, p in enumerate(self.data.photos)]
                      for f in families}

    def photo(self, i: int) -> LoadedImage:
        pixels = self.data.photos[i].permute(1, 2, 0).numpy()
        return LoadedImage(path=Path(self.data.names[i]), pixels=pixels, mode="RGB", source_mode="RGB")

    def fill(self, spec, method, family: str, seed: int, i: int):
        """(Filled, seconds) of photo i under noise seed `seed`: `aid inpaint --seed seed·2²⁰ + i`'s fill."""
        img, hole = self.photo(i), self.holes[family][i]
        opts = InpaintOptions(method=spec.label, steps=spec.steps, seed=seed * SEED_STRIDE + i, fit=self.fit)
        job = Job(image=img.path, mask=Path(f"{family}-{i}"), outputs=[])
        t0 = time.perf_counter()
        item = fit_hole(job, img, hole, self.resolution, opts, method.full_resolution, self.inpainter.multiscale)
        filled = fill_items(self.inpainter, [item], opts, method)[0]
        return filled, time.perf_counter() - t0

    def _photo_metrics(self, out: np.ndarray, truth: np.ndarray, hole: np.ndarray, label: str) -> dict:
        """Hole PSNR on the whole photo, SSIM and LPIPS on the hole's neighbourhood (metrics/bundle.py)."""
        from ..metrics.bundle import inpainting_metrics, per_image

        if not np.array_equal(out[~hole], truth[~hole]):
            raise RuntimeError(f"{label} changed visible pixels of a photo (a bug in the path)")
        x, x0 = _float(out), _float(truth)
        M = torch.from_numpy(~hole)[None, None].to(torch.float32)
        scores = inpainting_metrics(x, x0, M, self.lpips_model, self.lpips_vgg_model, region=neighbourhood(hole),
                                    note=self.note)
        ph, ss, lp, lv = (per_image(scores, k, 1)[0] for k in ("psnr_hole", "ssim", "lpips", "lpips_vgg"))
        # FID/KID of whole photos would be those of their visible pixels, and a hole's neighbourhood differs by
        # family: the photo benchmark reports no realism column yet (null)
        return {"psnr_hole": ph, "ssim": ss, "lpips": lp, "lpips_vgg": lv, "features": None, "finite": True}

    def original_features(self, batch: int = 50):
        return None

    def tile(self, pixels: np.ndarray, hole: np.ndarray) -> np.ndarray:
        """The square box around the hole (plan_native_crop) of `pixels`, at TILE x TILE, uint8 HWC."""
        img = LoadedImage(path=Path("tile"), pixels=pixels, mode="RGB", source_mode="RGB")
        fit = plan_native_crop(hole)
        x, _ = to_task_tensors(img, np.zeros_like(hole), fit)
        x = torch.nn.functional.interpolate(x, size=(TILE, TILE), mode="bicubic", antialias=True, align_corners=False)
        return to_uint8(x[0].clamp(-1, 1))

    def _warm_indices(self, batch: int) -> list[int]:
        return self.indices[:1]  # one photo per call, as the cells run them

    def _batch_scale(self, images: int, batch: int) -> float:
        return 1.0

    def _trial(self, spec, method, family: str, seed: int, idx: list[int]) -> tuple[float, float]:
        i = idx[0]
        filled, dt = self.fill(spec, method, family, seed, i)
        t0 = time.perf_counter()
        self._photo_metrics(filled.pixels[0], self.data.photos[i].permute(1, 2, 0).numpy(), self.holes[family][i],
                            spec.label)
        return dt, time.perf_counter() - t0

    def cells(self, specs, family: str, seed: int, batch: int, examples: int = 0, done_before: int = 0):
        self.warm_up(specs, family, seed, batch, done_before=done_before)  # (methods not yet warmed up)
        methods = [spec.build() for spec in specs]
        if self.progress:
            self.progress(done_before, f"{' + '.join(s.label for s in specs)} / {family} / seed {seed}")
        acc = [{"images": {}, "seconds": 0.0, "nfe": 0.0, "backward": 0.0, "mem": PeakMemory(self.device),
                "examples": {}} for _ in specs]
        for done, i in enumerate(self.indices, 1):
            truth, hole = self.data.photos[i].permute(1, 2, 0).numpy(), self.holes[family][i]
            for spec, method, a in zip(specs, methods, acc):
                with a["mem"].measure():
                    filled, dt = self.fill(spec, method, family, seed, i)
                a["seconds"] += dt
                a["nfe"] += filled.nfe
                a["backward"] += filled.backward
                a["images"][i] = self._photo_metrics(filled.pixels[0], truth, hole, spec.label)
                if i < examples:
                    a["examples"][i] = self.tile(filled.pixels[0], hole)
            if self.progress:
                self.progress(done_before + min(done * self.world, self.n) * len(specs),
                              f"{' + '.join(s.label for s in specs)} / {family} / seed {seed}")
        return [self._record(spec, family, seed, batch, a) for spec, a in zip(specs, acc)]

    def write_grids(self, out: Path, specs: list, families: list[str], k: int) -> list[Path]:
        """grid-<mask>.png: the box around each hole (input with the hole grey, each method's fill, the original)."""
        k = min(k, self.n)
        written = []
        for family in families:
            truths = [self.data.photos[i].permute(1, 2, 0).numpy() for i in range(k)]
            holes = self.holes[family][:k]
            grey = [np.where(h[..., None], np.uint8(128), t) for t, h in zip(truths, holes)]
            rows = [("input", [self.tile(g, h) for g, h in zip(grey, holes)])]
            for spec in specs:
                tiles = load_examples(out, spec.label, family, TILE, k)
                if tiles:
                    rows.append((spec.label, tiles))
            rows.append(("ground truth", [self.tile(t, h) for t, h in zip(truths, holes)]))
            path = out / f"grid-{family}.png"
            save_labelled_grid(path, rows, TILE)
            written.append(path)
        return written


RUNNERS["photos"] = PhotoRunner

__all__ = ["PhotoRunner", "neighbourhood", "PHOTO_METRIC_DEFINITIONS"]
