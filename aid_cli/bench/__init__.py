"""`aid bench`: every method on the same images, the same fixed masks and the same noise; quality, cost and speed.

The path of an image is `aid inpaint`'s (design.md): the Inpainter (inpainter.py) with one method resolved by
resolve.py → completed image M ⊙ y + M̄ ⊙ x̂. Nothing here re-implements a method or the loop. Latent backbones
(EDM2) take the same path through their space (backbones/spaces.py): images and masks at the VAE's pixel resolution
(8 × the network's), the Task on the latent grid, the completion decoded and its visible pixels pasted back; metrics are
computed in pixel space as for every backbone, and the timing includes the VAE's encoding and decoding.
Class-conditional backbones get `--class N` for every image, or else each image's label from the dataset's dataset.json.

Protocol (method.md §9)
  * Images: the first `n` of the dataset (folder or EDM zip, sorted by name, as `load_image_set` reads them) at the
    backbone's resolution. Image i gets mask i of each evaluation family (`data/masks.py`, version `MASKS_VERSION`, mask
    seed `mask_seed`): the masks are fixed by seed and identical for every method and every noise seed.
  * Noise: one CPU generator per image, seeded `seed·2²⁰ + i` (i the image's index; torch's CPU generator keeps only the
    low 32 bits of a seed, hence seeds < 4096 and n ≤ 2²⁰), so results depend neither on the batch size nor on how
    images are sharded across processes (up to floating-point differences of batched kernels).
  * A cell is (method, mask family, seed). Per image: PSNR over the hole, SSIM, LPIPS (AlexNet) and LPIPS-VGG (VGG16)
    of the completed image against x0 (metrics/quality.py, metrics/lpips.py). Per seed the mean over images; then
    mean ± std over seeds (sample std, ddof = 1; null for a single seed). Realism (unless --no-realism): the
    TF-Inception features of every completed image (metrics/fid.py; kept in OUT/features/, with the originals' once);
    per seed FID and KID of the n completions against the n originals (metrics/realism.py); a row's FID is their
    mean ± std over seeds, its KID their mean ± the std of that mean over a paired bootstrap of the images. PSNR-hole is +inf for an exact hole (the `copy` oracle): JSON null, "inf" in the
    table. A completion with non-finite values (a diverging step size) gets null metrics and is counted in
    `images_nonfinite`. Every finite completion is checked to keep the visible pixels exactly.
  * NFE and backward passes per image are the loop's own counts. Seconds per image: wall time of the cells' `sample`
    calls (CUDA/MPS synchronised around each call), summed over batches (and processes), divided by the images; with
    `--batch B` that is a batch's time / B. Before its first cell in a process, each method runs once untimed on one
    image (under --compile: on the first batch) and the backbone once at the batch's shape (Runner.warm_up); a second
    image, timed, gives the plan's estimate, unless finished cells of this folder already timed the method.
  * Peak memory per cell, over its sampler calls (metrics run outside the measured windows): CUDA:
    `torch.cuda.max_memory_allocated`, reset before each call (every tensor PyTorch holds on the device then, so the
    backbone's and LPIPS's weights too, ~10 MB for LPIPS; not the caching allocator's reserve). Elsewhere: the process's
    peak resident set size during the calls, sampled every 10 ms from /proc/self/statm (everything the process holds:
    Python, the backbone, the dataset, LPIPS, and memory freed but not returned to the OS; spikes shorter than the
    interval can be missed; on MPS, GPU allocations are not in it). Without /proc: `getrusage` ru_maxrss, the process's
    lifetime high-water mark, which never decreases from one cell to the next. The kind is recorded.
  * Torchrun: rank r takes images r::world; per-image metrics are gathered to rank 0, which alone writes.
  * Cells are appended to OUT/cells.jsonl as they finish (fsync'd); `--resume` skips cells already there with the same
    method params and steps. bench.json, bench.csv, the grids and the plot are rebuilt from the cells every time.

`aid bench --tune METHOD` runs `tune`: a grid of the method's step size on a few validation images (free-form masks, one
seed), best PSNR-hole (ties within 0.01 dB: lowest LPIPS), recorded beside the checkpoint (models/tuned.py).

Where each part lives: runner.py (the run: config, Runner, its warm-up, cells one by one), plan.py (what a run says it
will do, and its estimate), cells.py (cells.jsonl and the rows aggregated from it), measure.py (time, memory, device),
report.py (bench.json, CSV, Markdown, grids, the plot), tune.py (`--tune`), samples.py (the backbone's own images, for
a benchmark without --dataset).
"""

from .cells import CELLS_FILE, aggregate, read_cells
from .measure import device_name
from .report import MD_END, MD_START, markdown_parts, rich_table, rows_markdown, splice_markdown, write_reports
from .plan import count_evaluations, plan_text
from .runner import (MAX_SEED, SEED_STRIDE, BenchConfig, Runner, bench_generators, check_masks, parse_list, parse_seeds,
                     run_bench)
from .photos import PhotoRunner  # noqa: F401  (registers the photo benchmark)
from .samples import SAMPLES_N, SAMPLES_SEED, backbone_samples
from .tune import TUNABLE, tune, tune_grid

__all__ = ["BenchConfig", "Runner", "run_bench", "tune", "tune_grid", "TUNABLE", "parse_seeds", "parse_list",
           "check_masks", "rich_table", "rows_markdown", "markdown_parts", "splice_markdown", "aggregate",
           "bench_generators", "count_evaluations", "plan_text", "read_cells", "write_reports", "device_name",
           "CELLS_FILE", "MAX_SEED", "SEED_STRIDE", "MD_START", "MD_END", "backbone_samples", "SAMPLES_N",
           "SAMPLES_SEED"]
