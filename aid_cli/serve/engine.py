"""`aid serve`'s work: the models a page may choose, the one backbone kept loaded, and the queue that runs one fill at
a time on it, through the same library function as `aid inpaint` (fill.fill).

Nothing here knows about HTTP (server.py) and nothing from a client is ever a path: a page names a model by an id from
`Models.list()`, and an image or mask by the id its upload was given.
"""

from __future__ import annotations

import itertools
import queue
import secrets
import sys
import threading
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import UserError, one_line

STEPS_CHOICES = {12: 23, 18: 35}  # --steps N → NFE: the two operating points (AID-12, AID-18) the page offers
MAX_SAMPLES = 8  # samples per fill
MAX_DILATE = 64  # pixels (--dilate, --feather)


def new_id() -> str:
    """An id for an upload, a fill or a result: random, so that ids cannot be guessed or enumerated."""
    return secrets.token_hex(8)


# ----------------------------------------------------------------------------------------------------------- models

@dataclass(frozen=True)
class ModelChoice:
    """A backbone the page may choose: `id` (what the page sends), where it is on disk (never told to the page)."""

    id: str
    label: str
    path: Path
    resolution: int | None
    description: str
    default_method: str


class Models:
    """The backbones a page may choose: the one `aid serve` was started with (--model, default the embedded one), and
    every other backbone already in the cache (`aid models list` says which); nothing is downloaded for a page."""

    def __init__(self, startup: Path, startup_label: str, guidance=None, cache=None):
        from ..models.catalogue import MODELS, cached_path, lookup_model
        from ..resolve import default_method

        self.guidance, self.cache = guidance, cache
        entry = lookup_model(startup_label)
        first = ModelChoice(startup_label, startup_label, startup, entry.resolution if entry else None,
                            entry.description if entry else f"checkpoint {startup.name}",
                            default_method(None, guidance, startup, cache)[0])
        self.choices: dict[str, ModelChoice] = {first.id: first}
        for entry in MODELS:
            if entry.kind != "backbone" or entry.name in self.choices:
                continue
            path = cached_path(entry, cache)
            if path is None or path.resolve() == startup.resolve():
                continue
            self.choices[entry.name] = ModelChoice(entry.name, entry.name, path, entry.resolution, entry.description,
                                                   default_method(None, None, path, cache)[0])
        self.default = first.id

    def get(self, model_id: str | None) -> ModelChoice:
        if model_id is None or model_id == "":
            return self.choices[self.default]
        if model_id not in self.choices:
            raise UserError(f"unknown model {model_id!r}: this server offers {', '.join(self.choices)} (models in the "
                            f"cache; fetch others with `aid models download NAME`)")
        return self.choices[model_id]

    def guidance_for(self, choice: ModelChoice):
        """--guidance applies to the backbone it was given with, the startup one."""
        return self.guidance if choice.id == self.default else None

    def list(self) -> list[dict]:
        return [{"id": c.id, "label": c.label, "resolution": c.resolution, "description": c.description,
                 "default_method": c.default_method, "default": c.id == self.default} for c in self.choices.values()]


def page_methods() -> list[dict]:
    """The methods a page may run (oracles need the ground truth, which only `aid bench` has), with their NFE at the
    page's operating points."""
    from ..methods import METHODS

    out = []
    for name in sorted(METHODS):
        cls = METHODS[name]
        if getattr(cls, "oracle", False):
            continue
        nfe = {}
        try:
            probe = cls() if name != "aid" else None
            for steps in STEPS_CHOICES:
                nfe[steps] = probe.expected_nfe(steps) if probe is not None else STEPS_CHOICES[steps]
        except Exception:  # a method that needs constructor arguments: its NFE shows once it ran
            nfe = {}
        out.append({"name": name, "nfe": nfe, "doc": (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""})
    return out


# ------------------------------------------------------------------------------------------------------------ fills

@dataclass
class FillRequest:
    """One fill as a page asks for it, checked (`parse`): ids, never paths."""

    image: str
    mask: str
    model: str | None = None
    method: str | None = None  # None: the model's default (aid where a guidance module is at hand, else repaint)
    steps: int = 12
    seed: int = 0
    samples: int = 1
    fit: str = "auto"  # as aid inpaint's --fit
    dilate: int = 0
    feather: int = 0
    class_label: int | None = None

    @classmethod
    def parse(cls, body: dict) -> "FillRequest":
        """From the page's JSON; every bad field is one clear UserError."""
        if not isinstance(body, dict):
            raise UserError("a fill request is a JSON object")
        known = {"image", "mask", "model", "method", "steps", "seed", "samples", "fit", "dilate", "feather", "class"}
        unknown = sorted(set(body) - known)
        if unknown:
            raise UserError(f"unknown field(s) in the fill request: {', '.join(unknown)}")

        def text(name, required=False):
            value = body.get(name)
            if value is None or value == "":
                if required:
                    raise UserError(f"the fill request needs {name!r}")
                return None
            if not isinstance(value, str) or len(value) > 100:
                raise UserError(f"{name!r} must be a short string")
            return value

        def integer(name, default, lo, hi):
            value = body.get(name, default)
            if value is None:
                return default
            if isinstance(value, bool) or not isinstance(value, int):
                raise UserError(f"{name} must be a whole number, got {value!r}")
            if not lo <= value <= hi:
                raise UserError(f"{name} must be between {lo} and {hi}, got {value}")
            return value

        steps = integer("steps", 12, 2, 1000)
        if steps not in STEPS_CHOICES:
            raise UserError(f"steps must be one of {', '.join(map(str, STEPS_CHOICES))} (NFE "
                            f"{', '.join(map(str, STEPS_CHOICES.values()))}), got {steps}")
        fit = text("fit") or "auto"
        if fit not in ("auto", "crop", "resize", "native"):
            raise UserError(f"fit must be auto, crop, resize or native, got {fit!r}")
        feather = integer("feather", 0, 0, MAX_DILATE)
        if fit == "native" and feather:
            raise UserError("feather does not combine with fit native (its windows are filled at native scale)")
        label = body.get("class")
        return cls(image=text("image", True), mask=text("mask", True), model=text("model"), method=text("method"),
                   steps=steps, seed=integer("seed", 0, 0, 2**31 - 1), samples=integer("samples", 1, 1, MAX_SAMPLES),
                   fit=fit, dilate=integer("dilate", 0, 0, MAX_DILATE), feather=feather,
                   class_label=None if label is None else integer("class", None, 0, 1_000_000))


@dataclass
class Job:
    """A fill in the queue: what was asked, where it stands, and its results (result ids, one per sample)."""

    id: str
    request: FillRequest
    submitted: float = field(default_factory=time.time)
    state: str = "queued"  # queued → running → done | error
    order: int = 0  # place in submission order
    started_order: int | None = None  # the worker's count when it started this fill (1, 2, ...)
    started: float | None = None
    finished: float | None = None
    nfe_done: int = 0
    nfe_total: int = 0
    method: str | None = None
    why: str = ""
    results: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    def describe(self, position: int | None) -> dict:
        return {"id": self.id, "state": self.state, "position": position, "nfe_done": self.nfe_done,
                "nfe_total": self.nfe_total, "method": self.method or self.request.method, "why": self.why,
                "model": self.request.model, "steps": self.request.steps, "seed": self.request.seed,
                "samples": self.request.samples, "results": self.results, "notes": self.notes, "error": self.error,
                "started_order": self.started_order,
                "seconds": round(self.finished - self.started, 3) if self.finished and self.started else None}


class Stopped(Exception):
    """The server is stopping: the fill under way gives up at its next network evaluation."""


class Bounded:
    """A dict that keeps its newest entries: at most `count` of them and `budget` bytes (`size(value)` each)."""

    def __init__(self, count: int, budget: int, size: Callable[[object], int]):
        self.count, self.budget, self.size = count, budget, size
        self.items: OrderedDict[str, object] = OrderedDict()
        self.lock = threading.Lock()

    def put(self, key: str, value) -> None:
        with self.lock:
            self.items[key] = value
            self.items.move_to_end(key)
            total = sum(self.size(v) for v in self.items.values())
            while len(self.items) > 1 and (len(self.items) > self.count or total > self.budget):
                _, old = self.items.popitem(last=False)
                total -= self.size(old)

    def get(self, key: str):
        with self.lock:
            value = self.items.get(key)
            if value is not None:
                self.items.move_to_end(key)
            return value


class Engine:
    """One backbone loaded at a time and one worker thread that runs fills on it, first come first served, from a
    bounded queue: parallel requests wait their turn instead of sharing the cores. `fill` is the library's
    (fill.fill): the page's result is the one `aid inpaint` writes for the same inputs."""

    def __init__(self, models: Models, device, precision: str = "auto", queue_length: int = 4,
                 uploads=None, results: Bounded | None = None, threads: int | None = None,
                 log: Callable[[str], None] = lambda message: None):
        self.models, self.device, self.precision, self.log = models, device, precision, log
        self.uploads = uploads  # id → LoadedImage or hole (server.py's store)
        self.results = results or Bounded(256, 1 << 30, lambda r: len(r["png"]))
        self.queue: queue.Queue = queue.Queue(maxsize=queue_length)
        self.queue_length = queue_length
        self.jobs = Bounded(1024, 1 << 62, lambda job: 0)
        self.waiting: list[str] = []  # ids of queued jobs, in order (for their positions)
        self.lock = threading.Lock()
        self.counter = itertools.count(1)
        self.started_count = itertools.count(1)
        import torch

        # OpenMP's thread count is per thread: the worker takes the process's (or --threads), else a fill on the page
        # could run with another count than `aid inpaint` and differ from it in the last bit
        self.threads = threads or torch.get_num_threads()
        self.inpainter = None
        self.current: ModelChoice | None = None
        self.sha256: str | None = None
        self.loaded_guidance: dict = {}
        self.specs: dict = {}
        self.stopping = threading.Event()
        self.worker = threading.Thread(target=self._work, name="aid-serve-fills", daemon=True)

    # -- the model

    def load(self, choice: ModelChoice) -> None:
        """Make `choice` the loaded backbone (the previous one is dropped: one in memory at a time)."""
        if self.current is not None and self.current.id == choice.id:
            return
        from ..fileio import sha256_file
        from ..inpainter import Inpainter

        self.inpainter = self.current = None
        self.specs.clear()
        self.loaded_guidance.clear()
        t0 = time.perf_counter()
        self.inpainter = Inpainter.load(choice.path, self.device, precision=self.precision, notice=self.log)
        self.sha256 = sha256_file(choice.path)
        self.current = choice
        self.log(f"loaded {choice.label} ({self.inpainter.resolution}x{self.inpainter.resolution}) in "
                 f"{time.perf_counter() - t0:.1f} s")

    def chosen(self, choice: ModelChoice, method: str | None, steps: int):
        """The method as `aid inpaint` decides it (resolve.inpaint_method), once per (model, method, steps)."""
        from ..resolve import inpaint_method

        key = (choice.id, method, steps)
        if key not in self.specs:
            self.specs[key] = inpaint_method(method, steps, choice.path, self.models.guidance_for(choice),
                                             cache=self.models.cache, offline=True, notice=self.log,
                                             sha256=self.sha256, loaded=self.loaded_guidance)
        return self.specs[key]

    # -- the queue

    def start(self) -> None:
        self.worker.start()

    def submit(self, request: FillRequest) -> Job:
        """Queue a fill; a full queue is a UserError (the page says to wait)."""
        job = Job(new_id(), request)
        with self.lock:
            try:
                self.queue.put_nowait(job)
            except queue.Full:
                raise UserError(f"the queue is full ({self.queue_length} fills waiting): try again when one has "
                                f"finished") from None
            job.order = next(self.counter)
            self.waiting.append(job.id)
            self.jobs.put(job.id, job)
        return job

    def status(self, job_id: str) -> dict | None:
        job = self.jobs.get(job_id)
        if job is None:
            return None
        with self.lock:
            position = self.waiting.index(job.id) + 1 if job.id in self.waiting else None
        return job.describe(position)

    def stop(self, wait: float = 10.0) -> None:
        """Stop the worker: the fill under way gives up at its next network evaluation; queued ones are dropped."""
        self.stopping.set()
        try:
            self.queue.put_nowait(None)
        except queue.Full:
            pass
        if self.worker.is_alive():
            self.worker.join(wait)

    def _work(self) -> None:
        import torch

        torch.set_num_threads(self.threads)
        while not self.stopping.is_set():
            job = self.queue.get()
            if job is None or self.stopping.is_set():
                break
            with self.lock:
                if job.id in self.waiting:
                    self.waiting.remove(job.id)
                job.state, job.started = "running", time.time()
                job.started_order = next(self.started_count)
            try:
                self._run(job)
                job.state = "done"
            except Stopped:
                job.state, job.error = "error", "the server stopped before this fill finished"
            except UserError as e:
                job.state, job.error = "error", " ".join(part.strip() for part in str(e).splitlines() if part.strip())
            except Exception as e:  # a bug: the page gets one line, the server's terminal the traceback
                traceback.print_exc(file=sys.stderr)
                job.state, job.error = "error", f"internal error: {one_line(e, with_type=True)}"
            finally:
                job.finished = time.time()
                self.queue.task_done()

    def _run(self, job: Job) -> None:
        from ..data.images import encode_png
        from ..fill import Filled, InpaintOptions, fill
        from ..task import class_labels

        r = job.request
        img, hole = self.uploads.image(r.image), self.uploads.mask(r.mask, r.image)
        choice = self.models.get(r.model)
        self.load(choice)
        inpainter = self.inpainter
        labels = class_labels(r.class_label, inpainter.info["label_dim"], 1)
        chosen = self.chosen(choice, r.method, r.steps)
        job.method, job.why = chosen.name, chosen.why.strip()
        opts = InpaintOptions(method=chosen.name, steps=r.steps, seed=r.seed, samples=r.samples, fit=r.fit,
                              params=chosen.params, class_label=r.class_label, method_default=bool(chosen.why),
                              dilate=r.dilate, feather=r.feather)

        def expected(total: int) -> None:
            job.nfe_total = total

        def progress(k: int) -> None:
            if self.stopping.is_set():
                raise Stopped()
            job.nfe_done += k
            job.nfe_total = max(job.nfe_total, job.nfe_done)

        done = fill(inpainter, img, hole, opts, chosen.spec, labels, progress, notice=job.notes.append,
                    expected=expected)
        if done is None:  # an empty hole: the image back, as aid inpaint copies it through
            job.notes.append("the mask is empty (nothing to fill): the image is given back unchanged")
            done = Filled(None, [img.pixels.copy() for _ in range(r.samples)], 0, 0, 0.0, "copied", "pixels")
        job.nfe_total = job.nfe_done  # what it took (an adaptive method's retries included)
        for k, pixels in enumerate(done.pixels):
            result_id = new_id()
            self.results.put(result_id, {"png": encode_png(pixels, img)})
            job.results.append({"id": result_id, "url": f"/api/results/{result_id}.png", "seed": r.seed + k,
                                "method": chosen.name, "nfe": done.nfe, "backward": done.backward,
                                "seconds": round(done.seconds, 3), "fit": done.how, "space": done.space,
                                "steps": r.steps, "model": choice.label})


__all__ = ["Engine", "FillRequest", "Job", "ModelChoice", "Models", "Bounded", "STEPS_CHOICES", "page_methods",
           "new_id"]
