"""Guidance recipes: a module made in stages, each an `aid train` run warm-started (`--init`) from the module the stage
before selected, written as a TOML file (shipped ones in recipes/, found by name).

    [options]            # `aid train` options (without their dashes) that every stage shares
    estimator = "backprop"
    [[stage]]            # one run, OUT/stage-K; its own options over [options]
    iters = 200
    select = "last"      # the module it hands on: "last" (its final checkpoint) or "lpips" (selection.py)
    [[stage.then]]       # optional: the same run continued (--resume) to more iterations, with a new --ema-halflife

`run_recipe` runs the stages in turn; a stage with OUT/stage-K/selected.json is done and skipped, so a stopped recipe
continues where it stopped.
"""

from __future__ import annotations

import json
import shutil
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import UserError
from ..fileio import atomic_write, atomic_write_text, sha256_file
from ..training import dist_info, state_metadata
from .selection import SELECT_RULES, select_checkpoint
from .trainer import GUIDANCE_FILE, STATE_FILE

RECIPES_DIR = Path(__file__).parent / "recipes"
PLAN_FILE = "recipe.json"
SELECTED_FILE = "selected.json"
# what the command says (where, on what, on which machine), never a recipe: refused in a recipe file
COMMAND_ONLY = ("dataset", "val", "out", "resume", "init", "recipe", "config", "device", "threads")
THEN_KEYS = ("iters", "ema-halflife")  # what a continued run may change (trainer.setup's free settings)


@dataclass
class Stage:
    options: dict  # option name (as on the command line, without dashes) → value: [options] and the stage's own
    then: list[dict] = field(default_factory=list)  # continuations of the same run (THEN_KEYS)
    select: str = "last"

    def legs(self) -> list[dict]:
        """The options of each run of the stage: the first, then each continuation's (iters grow)."""
        return [self.options] + [{**self.options, **leg} for leg in self.then]


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.toml"))


def recipe_file(name: str) -> Path:
    """The shipped recipe NAME (recipes/NAME.toml)."""
    path = RECIPES_DIR / f"{name}.toml"
    if not path.is_file():
        raise UserError(f"unknown recipe {name!r}: shipped ones are {', '.join(recipe_names()) or 'none'} "
                        f"(or --config FILE for your own)")
    return path


def load_recipe(path: Path, known: set[str]) -> list[Stage]:
    """The stages of a recipe file; `known`: the option names `aid train` takes. Any other key, or a key the command
    must give (COMMAND_ONLY), is refused in one line."""
    try:
        doc = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise UserError(f"recipe {path}: {e}") from None
    where = Path(path).name
    unknown = set(doc) - {"description", "options", "stage"}
    if unknown:
        raise UserError(f"recipe {where}: unknown section {sorted(unknown)[0]!r} (it holds description, [options] "
                        f"and [[stage]])")

    def checked(table, what: str, allowed=None) -> dict:
        if not isinstance(table, dict):
            raise UserError(f"recipe {where}: {what} must be a table of options")
        for key, value in table.items():
            if key in COMMAND_ONLY:
                raise UserError(f"recipe {where}: {what} sets {key!r}, which the command gives (--{key}), not a recipe")
            if key not in known or (allowed is not None and key not in allowed):
                hint = f"only {', '.join(allowed)}" if allowed is not None else "see `aid train -h`"
                raise UserError(f"recipe {where}: {what}: {key!r} is not an option here ({hint})")
            if isinstance(value, (dict, list)):
                raise UserError(f"recipe {where}: {what}: {key} must be a single value")
        return table

    shared = checked(doc.get("options", {}), "[options]")
    stages = doc.get("stage")
    if not isinstance(stages, list) or not stages:
        raise UserError(f"recipe {where}: no [[stage]]")
    out = []
    for k, table in enumerate(stages, 1):
        table = dict(table)
        select = table.pop("select", "last")
        if select not in SELECT_RULES:
            raise UserError(f"recipe {where}: stage {k}: select must be one of {', '.join(SELECT_RULES)}")
        then = table.pop("then", [])
        options = {**shared, **checked(table, f"stage {k}")}
        if "iters" not in options:
            raise UserError(f"recipe {where}: stage {k} has no iters")
        legs = [checked(leg, f"stage {k}'s then", THEN_KEYS) for leg in then]
        last = options["iters"]
        for leg in legs:
            if leg.get("iters", 0) <= last:
                raise UserError(f"recipe {where}: stage {k}'s then must continue past iteration {last} (iters)")
            last = leg["iters"]
        out.append(Stage(options=options, then=legs, select=select))
    return out


def apply_overrides(stages: list[Stage], overrides: dict) -> list[Stage]:
    """The stages with the command line's options over every stage's. `iters` is per run: each stage runs that many
    iterations and each continuation that many more."""
    iters = overrides.get("iters")
    rest = {k: v for k, v in overrides.items() if k != "iters"}
    out = []
    for s in stages:
        options = {**s.options, **rest}
        then = [{**leg, **{k: v for k, v in rest.items() if k in leg}} for leg in s.then]
        if iters is not None:
            options["iters"] = iters
            then = [{**leg, "iters": iters * (j + 2)} for j, leg in enumerate(then)]
        out.append(Stage(options=options, then=then, select=s.select))
    return out


def write_plan(out: Path, stages: list[Stage], resume: bool) -> None:
    """OUT/recipe.json: the stages as run. A new recipe run never reuses a folder that holds one; --resume needs the
    same plan (the same recipe and options), so a resumed stage continues what it started."""
    path = out / PLAN_FILE
    plan = [asdict(s) for s in stages]
    if not resume:
        if dist_info()[0] == 0 and (path.exists() or any(out.glob("stage-*"))):
            raise UserError(f"{out} already holds a recipe run; pass --resume to continue it or choose another --out")
    else:  # (under torchrun rank 0 alone checks a new run's folder: it writes the plan)
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError):
            raise UserError(f"--resume: {path} is missing or unreadable; {out} holds no recipe run to continue") \
                from None
        if saved != json.loads(json.dumps(plan)):
            raise UserError(f"--resume: {out} was made by another recipe or other options ({path}); resume it "
                            f"with the command that started it")
        return
    if dist_info()[0] == 0:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(plan, indent=2))


def _shown(path: Path, out: Path) -> str:
    """A module's path as the log shows it: relative to the recipe's folder where it lies inside it."""
    return str(path.relative_to(out)) if path.is_relative_to(out) else str(path)


def run_recipe(stages: list[Stage], out: Path, resume: bool, run_stage: Callable[[dict, Path, Path | None, bool], None],
               log, init: Path | None = None) -> Path | None:
    """Run the stages into OUT/stage-1, OUT/stage-2, …, each warm-started from the module the one before selected
    (the first from `init`, `aid train --init`, or from scratch); `run_stage(options, folder, init, resume)` trains
    one run. Returns OUT/guidance.safetensors (the last stage's selected module), or None when a run stopped early (a
    signal): the same command with --resume continues it."""
    out = Path(out)
    write_plan(out, stages, resume)
    rank = dist_info()[0]
    init = Path(init) if init is not None else None
    for k, stage in enumerate(stages, 1):
        folder = out / f"stage-{k}"
        selected = folder / SELECTED_FILE
        if selected.is_file():
            init = folder / json.loads(selected.read_text())["module"]
            log(f"stage {k}/{len(stages)}: done before, selected {_shown(init, out)}")
            continue
        for j, options in enumerate(stage.legs()):
            state = folder / STATE_FILE
            done = state_metadata(state)["iteration"] if state.is_file() else None
            if done is not None and done >= options["iters"]:
                continue
            log(f"stage {k}/{len(stages)}" + (f", continued to iteration {options['iters']}" if j else "")
                + f": {folder}" + (f", from {_shown(init, out)}" if init and not j else ""))
            run_stage(options, folder, init, done is not None)
            if not state.is_file() or state_metadata(state)["iteration"] < options["iters"]:
                return None  # stopped early: its state is saved
        it, module = select_checkpoint(folder, stage.select, log)
        if rank == 0:
            atomic_write_text(selected, json.dumps({"select": stage.select, "iteration": it,
                                                    "module": str(module.relative_to(folder)),
                                                    "sha256": sha256_file(module)}, indent=2))
        log(f"stage {k}/{len(stages)}: selected iteration {it} ({stage.select})")
        init = module
    final = out / GUIDANCE_FILE
    if rank == 0:
        atomic_write(final, lambda tmp: shutil.copyfile(init, tmp))
    return final
