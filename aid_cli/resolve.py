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
from .methods import Method, get_method
from .methods.base import MethodName, parse_method

RECORDED_ONLY = ("guidance",)  # recorded with a method's params, never passed to its constructor


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


def named_guidance(variant: str, guidances: dict | None = None) -> str:
    """The guidance module `aid-18:NAME` names: one given as --guidance NAME=PATH (`guidances`), else a guidance module
    of the model catalogue (`aid models list`)."""
    from .models.catalogue import lookup_model

    if guidances and variant in guidances:
        return guidances[variant]
    entry = lookup_model(variant)
    if entry is not None and entry.kind == "guidance":
        return entry.name
    hint = f" (aid bench: add --guidance {variant}=PATH)" if guidances is not None else ""
    raise UserError(f"no guidance module named {variant!r}: aid-18:NAME takes a guidance module's name from `aid "
                    f"models list`{hint}")


def check_method_names(labels: list[str], guidances: dict | None = None) -> list[MethodName]:
    """Fail fast, before anything is loaded, on a name parse_method refuses or a guidance module no one named."""
    names = [parse_method(label) for label in labels]
    for name in names:
        if name.variant is not None:
            named_guidance(name.variant, guidances)
    return names


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
                   cache=None, offline: bool | None = None, loaded: dict | None = None,
                   churn: float | None = None) -> MethodSpec:
    """A command-line method name → what runs: an operating point (aid-18: method `aid` at 18 steps), or a registered
    method with the backbone's tuned params (models/tuned.py) when it has them, else the method's defaults.

    AID gets its guidance module (`guidance`, default: the embedded one; `aid-18:NAME` the one named_guidance finds; a
    model name is fetched with `cache` and `offline`), checked against the backbone (`sha256`, else the checkpoint's
    own, hashed once) and loaded; `loaded` (path → actor) shares one load among the specs of a command. AID's solve
    takes EDM's churn S_churn (`churn`, else the value its module was trained with, else 0: the deterministic ODE);
    other methods ignore it."""
    from .fileio import sha256_file
    from .models.tuned import tuned_entries

    name = check_method_names([label], guidances)[0]
    if name.variant is not None:
        guidance = named_guidance(name.variant, guidances)
    if name.method == "aid" and sha256 is None and checkpoint is not None:
        sha256 = sha256_file(checkpoint)
    if name.steps is not None:
        spec = MethodSpec(label, name.method, {}, name.steps, "operating point")
    else:
        entry = tuned_entries(checkpoint, sha256, notice).get(name.method) if checkpoint is not None else None
        if entry and isinstance(entry.get("params"), dict):
            spec = MethodSpec(label, name.method, dict(entry["params"]), steps,
                              f"tuned: {entry.get('record', '?')} ({entry.get('date', 'undated')})")
        else:
            spec = MethodSpec(label, name.method, {}, steps, "defaults")
    if spec.method == "aid":
        from .guidance.checkpoint import load_guidance, trained_churn
        from .models.catalogue import resolve_guidance

        path = resolve_guidance(guidance, cache=cache, offline=offline)
        loaded = {} if loaded is None else loaded
        key = (Path(path).resolve(), sha256)
        if key not in loaded:  # a module for another backbone fails here, in one line
            loaded[key] = load_guidance(path, backbone_sha256=sha256)
        actor, info = loaded[key]
        if churn is None:  # the module's own: a module trained with churn is deployed with it
            churn = trained_churn(info)
        if churn:
            spec.params["churn"] = float(churn)
        spec.params["guidance"] = str(Path(path).resolve())
        spec.resources["guidance_sha256"] = sha256_file(path)
        spec.runtime["actor"] = actor
        spec.guidance, spec.backbone_sha256 = Path(path), sha256
    return spec


@dataclass
class InpaintMethod:
    """What `aid inpaint` and `aid serve` run on one backbone: the method's name (given or default), its spec, the
    params recorded with each output, and why it was chosen ("" when it was given)."""

    name: str
    spec: MethodSpec
    params: dict  # recorded: the spec's params; AID: + the backbone's sha256 the module was checked against
    tuned: dict  # the backbone's tuned params when they are used (the CLI says so), else {}
    why: str

    @property
    def steps(self) -> int:
        return self.spec.steps


def check_inpaint_method(method: str | None, steps: int | None, guidance=None,
                         churn: float | None = None) -> MethodName | None:
    """`aid inpaint`'s --method, --steps and --guidance together, before anything loads: an operating point fixes N
    (a different --steps is refused), --guidance is AID's alone, and `aid-18:NAME` names its module already."""
    if method is None:
        return None
    parsed = check_method_names([method])[0]
    parsed.steps_for(steps)
    if churn is not None and parsed.method != "aid":
        raise UserError(f"--churn is EDM's churn on AID's solve; --method {method} takes none (drop --churn)")
    if guidance is not None and parsed.method != "aid":
        raise UserError(f"--guidance is AID's guidance module; --method {method} takes none (drop one of them)")
    if guidance is not None and parsed.variant is not None:
        raise UserError(f"--method {method} names its guidance module already; drop --guidance, or use --method "
                        f"{method.partition(':')[0]}")
    return parsed


def inpaint_method(method: str | None, steps: int | None, checkpoint: Path, guidance=None, cache=None,
                   offline: bool | None = None, notice: Callable[[str], None] | None = None,
                   sha256: str | None = None, loaded: dict | None = None,
                   churn: float | None = None) -> InpaintMethod:
    """`--method` (None: the default for this backbone, default_method), `--steps` (None: the operating point's, else
    18) and `--guidance` → what fills the images, as `aid inpaint` and `aid serve` both decide it (check_inpaint_method,
    resolve_method); `sha256` and `loaded` save a server the backbone's hash and the module's load on every fill.
    `churn`: AID's S_churn (None: its module's own); refused for another method."""
    check_inpaint_method(method, steps, guidance, churn)
    name, guidance, why = default_method(method, guidance, checkpoint, cache)
    if churn is not None and parse_method(name).method != "aid":
        raise UserError(f"--churn is EDM's churn on AID's solve; --method {name} takes none (drop --churn)")
    spec = resolve_method(name, parse_method(name).steps_for(steps), checkpoint, sha256=sha256, notice=notice,
                          guidance=guidance, cache=cache, offline=offline, loaded=loaded, churn=churn)
    params = dict(spec.params)
    if spec.method == "aid":  # recorded: the backbone the module was checked against
        params["backbone_sha256"] = spec.backbone_sha256
    tuned = dict(spec.params) if spec.params_source.startswith("tuned") else {}
    return InpaintMethod(name, spec, params, tuned, why)


__all__ = ["MethodSpec", "InpaintMethod", "check_inpaint_method", "check_method_names", "default_method",
           "inpaint_method", "named_guidance", "resolve_method"]
