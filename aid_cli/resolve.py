"""Which method runs, and with what: decided once, here, for `aid inpaint`, `aid bench` and `aid bench --tune`.

A name on the command line becomes a `MethodSpec`: the registered method, its parameters, its number of steps and
where they came from. The name is a registered method (`dps`) or an operating point (`aid-18`: method `aid` at N = 18;
`aid-18:NAME` with the guidance module named NAME). Parameters are the backbone's tuned ones (`aid bench --tune`,
models/tuned.py) where it has them, else the method's defaults. AID gets its guidance module here: the file is found
(models/catalogue.py), checked against the backbone it was trained on and loaded once per command; the method itself
receives the loaded actor and never looks up a file (methods/aid.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .errors import UserError
from .methods import METHODS, Method, get_method

# Operating points: a name on the command line → (registered method, params, steps or None for --steps).
OPERATING_POINTS: dict[str, tuple[str, dict, int | None]] = {
    "aid-12": ("aid", {}, 12),
    "aid-18": ("aid", {}, 18),
}

RECORDED_ONLY = ("guidance", "backbone_sha256")  # recorded with a method's params, never passed to its constructor


@dataclass
class MethodSpec:
    """One method as it will run: a name as the user wrote it, the registered method, its params and steps."""

    label: str
    method: str
    params: dict = field(default_factory=dict)  # constructor params, as recorded (JSON); AID: + its module's path
    steps: int = 18
    params_source: str = "defaults"
    resources: dict = field(default_factory=dict)  # what else a result depends on (the guidance module's sha256)
    runtime: dict = field(default_factory=dict)  # constructor arguments that are not recorded (AID's loaded actor)
    guidance: Path | None = None  # AID: the module's file, as resolved from --guidance
    backbone_sha256: str | None = None  # AID: the backbone the module was checked against

    def build(self) -> Method:
        """A fresh instance of the method (cheap: AID's actor is already loaded)."""
        params = {k: v for k, v in self.params.items() if k not in RECORDED_ONLY}
        return get_method(self.method, **params, **self.runtime)


def split_variant(label: str) -> tuple[str, str | None]:
    """`aid-18:pathwise` → ("aid-18", "pathwise"): an AID operating point with the guidance module named `pathwise`."""
    base, sep, variant = label.partition(":")
    return base, (variant if sep else None)


def check_method_names(labels: list[str], guidances: dict | None = None) -> None:
    """Fail fast, before anything is loaded, on a name that is neither a method nor an operating point."""
    for label in labels:
        label, variant = split_variant(label)
        if variant is not None:
            if label not in OPERATING_POINTS and label != "aid":
                raise UserError(f"only AID takes a guidance variant (aid-18:NAME), got {label}:{variant}")
            if guidances is not None and variant not in guidances:
                raise UserError(f"no guidance module named {variant!r}: add --guidance {variant}=PATH")
        if label not in OPERATING_POINTS and label not in METHODS:
            known = sorted(METHODS) + sorted(OPERATING_POINTS)
            raise UserError(f"unknown method {label!r} (available: {', '.join(known)})")
        if label in METHODS:
            METHODS[label].check_available()  # a missing optional extra: one line, before anything is loaded


def default_method(method: str | None, guidance, checkpoint, cache=None) -> tuple[str, object, str]:
    """(method, guidance, why) of `aid inpaint`: the method given, or the default for this backbone (aid with the
    guidance module at hand, else repaint), and the words the `wrote` line says it with ("" when --method was given)."""
    if method is not None:
        return method, guidance, ""
    if guidance is not None:
        return "aid", guidance, " by default: --guidance given"
    from .models.catalogue import guidance_at_hand

    found = guidance_at_hand(checkpoint, cache)
    if found is not None:
        return "aid", found[1], f" by default: {found[0]} is this backbone's guidance module"
    return "repaint", None, (" by default: no guidance module for this backbone, and repaint is the best "
                             "training-free method")


def resolve_method(label: str, steps: int, checkpoint: Path | None = None, sha256: str | None = None,
                   notice: Callable[[str], None] | None = None,
                   guidance: str | os.PathLike | None = None, guidances: dict | None = None,
                   cache=None, offline: bool | None = None, loaded: dict | None = None) -> MethodSpec:
    """A command-line method name → what runs: an operating point (aid-18: method `aid` at 18 steps), or a registered
    method with the backbone's tuned params (models/tuned.py) when it has them, else the method's defaults.

    AID gets its guidance module (`guidance`, default: the embedded one; `aid-18:NAME` takes `guidances[NAME]`; a
    model name is fetched with `cache` and `offline`), checked against the backbone (`sha256`, else the checkpoint's
    own) and loaded; `loaded` (path → actor) shares one load among the specs of a command."""
    from .models.tuned import tuned_entries

    check_method_names([label], guidances)
    base, variant = split_variant(label)
    if variant is not None:
        guidance = guidances[variant]
    if base in OPERATING_POINTS:
        name, params, point_steps = OPERATING_POINTS[base]
        spec = MethodSpec(label, name, dict(params), point_steps or steps, "operating point")
    else:
        entry = tuned_entries(checkpoint, sha256, notice).get(label) if checkpoint is not None else None
        if entry and isinstance(entry.get("params"), dict):
            spec = MethodSpec(label, label, dict(entry["params"]), steps,
                              f"tuned: {entry.get('record', '?')} ({entry.get('date', 'undated')})")
        else:
            spec = MethodSpec(label, base, {}, steps, "defaults")
    if spec.method == "aid":
        from .fileio import sha256_file
        from .guidance.checkpoint import load_guidance
        from .models.catalogue import resolve_guidance

        path = resolve_guidance(guidance, cache=cache, offline=offline)
        sha256 = sha256 or (sha256_file(checkpoint) if checkpoint is not None else None)
        loaded = {} if loaded is None else loaded
        key = (Path(path).resolve(), sha256)
        if key not in loaded:  # a module for another backbone fails here, in one line
            loaded[key] = load_guidance(path, backbone_sha256=sha256)[0]
        spec.params["guidance"] = str(Path(path).resolve())
        spec.resources["guidance_sha256"] = sha256_file(path)
        spec.runtime["actor"] = loaded[key]
        spec.guidance, spec.backbone_sha256 = Path(path), sha256
    return spec


@dataclass
class InpaintMethod:
    """What `aid inpaint` and `aid serve` run on one backbone: the method's name (given or default), its spec, the
    params recorded with each output, and why it was chosen ("" when it was given)."""

    name: str
    spec: MethodSpec
    params: dict  # recorded: the backbone's tuned params; AID: + the module's path and the backbone's sha256
    tuned: dict  # the backbone's tuned params alone (the CLI says when it uses them)
    why: str


def inpaint_method(method: str | None, steps: int, checkpoint: Path, guidance=None, cache=None,
                   offline: bool | None = None, notice: Callable[[str], None] | None = None,
                   sha256: str | None = None, loaded: dict | None = None) -> InpaintMethod:
    """`--method` (None: the default for this backbone, default_method) and `--guidance` → what fills the images, as
    `aid inpaint` and `aid serve` both decide it (resolve_method); `sha256` and `loaded` save a server the backbone's
    hash and the module's load on every fill."""
    name, guidance, why = default_method(method, guidance, checkpoint, cache)
    spec = resolve_method(name, steps, checkpoint, sha256=sha256, notice=notice, guidance=guidance, cache=cache,
                          offline=offline, loaded=loaded)
    tuned = {k: v for k, v in spec.params.items() if k not in RECORDED_ONLY}  # the backbone's tuned ones
    params = dict(tuned)
    if spec.method == "aid":  # recorded: the module (as given) and the backbone it was checked against
        params.update(guidance=str(spec.guidance), backbone_sha256=spec.backbone_sha256)
    return InpaintMethod(name, spec, params, tuned, why)


__all__ = ["OPERATING_POINTS", "MethodSpec", "InpaintMethod", "check_method_names", "default_method",
           "inpaint_method", "resolve_method", "split_variant"]
