"""What `aid pretrain` and `aid train` share: distributed set-up, per-step seeding, and resumable training state.

Training state is one safetensors file: every module's state dict under `<name>.`, every Adam optimizer's moments under
`<name>.<param index>.`, and counters and param groups in the metadata. Randomness of step k comes from a generator seeded
by (seed, k) alone, so a resumed run continues exactly as an uninterrupted one would, with no RNG state to carry.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from .fileio import clean_stale_temps, save_safetensors


def dist_info() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) for a plain process."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device: torch.device) -> tuple[int, int, torch.device]:
    """Join torchrun's process group when there is one; returns (rank, world, this process's device)."""
    rank, world = dist_info()
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        atexit.register(_leave_distributed)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return rank, world, device


def gather_to_rank0(obj, rank: int, world: int) -> list | None:
    """Every process's `obj`, in rank order, on rank 0 (None on the others); [obj] for one process."""
    if world == 1:
        return [obj]
    out = [None] * world if rank == 0 else None
    torch.distributed.gather_object(obj, out, dst=0)
    return out


def _leave_distributed() -> None:
    """Destroy the process group before the interpreter tears down: a gloo group left alive at exit can abort the
    process ("terminate called without an active exception", SIGABRT) after its work is done."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        try:
            torch.distributed.destroy_process_group()
        except Exception:  # already broken (a peer died): exiting is all that is left
            pass


def step_generator(seed: int, step: int) -> torch.Generator:
    """All randomness of training step `step` comes from this generator."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def save_state(path, modules: dict, optimizers: dict, meta: dict) -> None:
    """Write modules, Adam moments and `meta` (JSON-able values) to one safetensors file, atomically.

    Module and optimizer names must differ (they prefix the tensor names)."""
    if modules.keys() & optimizers.keys():
        raise ValueError("module and optimizer names must differ")
    tensors = {}
    for name, module in modules.items():
        tensors.update({f"{name}.{k}": v.detach().cpu().contiguous() for k, v in module.state_dict().items()})
    groups = {}
    for name, opt in optimizers.items():
        sd = opt.state_dict()
        for i, st in sd["state"].items():
            for k, v in st.items():
                tensors[f"{name}.{i}.{k}"] = torch.as_tensor(v).detach().cpu().contiguous()
        groups[name] = sd["param_groups"]
    metadata = {k: json.dumps(v) for k, v in meta.items()}
    metadata["param_groups"] = json.dumps(groups)
    save_safetensors(path, tensors, metadata)


def load_state(path, modules: dict, optimizers: dict, device="cpu", optional: tuple[str, ...] = ()) -> dict:
    """Restore what `save_state` wrote into the given modules and optimizers; returns the metadata. Modules named in
    `optional` that the file does not hold are left as they are (a state saved before they existed). A corrupt or
    mismatched state file is a one-line CheckpointError."""
    from .errors import CheckpointError

    try:
        return _load_state(path, modules, optimizers, device, optional)
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError, TypeError, IndexError) as e:
        detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"--resume: the training state {path} is corrupt or does not fit this run: "
                              f"{detail}") from None


def _load_state(path, modules: dict, optimizers: dict, device="cpu", optional: tuple[str, ...] = ()) -> dict:
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    sd = load_file(str(path), device=str(device))
    for name, module in modules.items():
        prefix = f"{name}."
        held = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        if held or name not in optional:
            module.load_state_dict(held)
    groups = json.loads(metadata.pop("param_groups"))
    for name, opt in optimizers.items():
        state: dict[int, dict] = {}
        prefix = f"{name}."
        for k, v in sd.items():
            rest = k[len(prefix):] if k.startswith(prefix) else ""
            head, _, tail = rest.partition(".")
            if head.isdigit() and tail:
                state.setdefault(int(head), {})[tail] = v
        opt.load_state_dict({"state": state, "param_groups": groups[name]})
    return {k: json.loads(v) for k, v in metadata.items()}


def read_jsonl(path, notice=None) -> list[dict]:
    """The JSON-object lines of a log such as stats.jsonl; lines that are not one (a torn last line) are dropped, and
    `notice` (when given) is told how many in one line. A missing file has no records."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    records, bad = [], 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError):  # torn, or nested beyond the parser's stack: not a record of ours
            rec = None
        if isinstance(rec, dict):
            records.append(rec)
        else:
            bad += 1
    if bad and notice is not None:
        notice(f"{path.name}: dropped {bad} unreadable line{'s' if bad > 1 else ''} (cut off by a crash or a full disk?)")
    return records


def truncate_log(path, key: str, last: int | float, notice=None) -> int:
    """Keep only the records of the jsonl log at `path` whose `key` is at most `last` (the step a resumed run continues
    from), dropping torn lines too, so a killed run neither logs steps twice nor appends onto a cut-off line. The log is
    rewritten atomically; returns how many lines were dropped."""
    from .fileio import atomic_write_text

    path = Path(path)
    if not path.is_file():
        return 0
    lines = [ln for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    kept = []
    for line in lines:
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(rec, dict) and not (isinstance(rec.get(key), (int, float)) and rec[key] > last):
            kept.append(line)
    dropped = len(lines) - len(kept)
    if dropped:
        atomic_write_text(path, "".join(line + "\n" for line in kept))
        if notice is not None:
            notice(f"--resume: {path.name} cut back to {key} {last} ({dropped} line{'s' if dropped > 1 else ''} "
                   f"dropped: logged after the saved state, or torn)")
    return dropped


def state_metadata(path) -> dict:
    """The JSON metadata of a training-state file, or a one-line CheckpointError for a corrupt one."""
    from .errors import CheckpointError

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        return {k: json.loads(v) for k, v in metadata.items()}
    except Exception as e:  # safetensors' own errors, JSON errors, OS errors
        raise CheckpointError(f"--resume: the training state {path} is corrupt or unreadable "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'})") from None


RUN_LOCK = ".lock"


@contextlib.contextmanager
def run_lock(run: Path):
    """Hold the run folder for this process (under torchrun: for the job, through rank 0) until the block ends; a
    second `aid train`/`aid pretrain` on the same folder is refused in one line instead of training beside it (and
    logging every iteration twice). The lock is an OS file lock: it dies with the process, however it ends."""
    from filelock import FileLock, Timeout

    from .errors import UserError

    if dist_info()[0] != 0:
        yield
        return
    run = Path(run)
    made = not run.exists()
    try:
        run.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(run / RUN_LOCK), timeout=0)
        lock.acquire()
    except Timeout:
        raise UserError(f"{run} is in use by another training process (it holds {run / RUN_LOCK}); wait for it to "
                        f"finish, or choose another --out") from None
    except OSError as e:
        raise UserError(f"cannot use the run folder {run} ({e.strerror or e})") from None
    try:
        yield
    finally:
        lock.release()
        if made and {p.name for p in run.iterdir()} <= {RUN_LOCK}:  # a run that failed before writing anything
            with contextlib.suppress(OSError):
                (run / RUN_LOCK).unlink()
                run.rmdir()


def skip_reporter(log, rank: int):
    """`on_skip` for a data set's loader: rank 0 tells `log` of each unreadable image it skipped."""
    return (lambda name, why: log(f"skipped {name}: {why}")) if rank == 0 else None


def prepare_run(cfg, run: Path, state_file: str, resume: bool, free: tuple[str, ...], log,
                free_if_given: tuple[str, ...] = ()):
    """The config a run continues with. On --resume the run's own saved settings win, except the keys in `free`
    (where the data is, how long, how often to save) and those in `free_if_given` that the command gives (not None:
    a setting a run may change part-way; not given, the run's own, or its default for a run made before it); without
    --resume an existing run is never overwritten."""
    import dataclasses

    from .errors import UserError

    state_path = run / state_file
    if not resume:
        if state_path.exists():
            raise UserError(f"{run} already holds a run; pass --resume to continue it or choose another --out")
        stats = run / "stats.jsonl"
        if dist_info()[0] == 0 and stats.is_file():  # a run killed before its first checkpoint: nothing to continue
            stats.unlink()
            log(f"{run} holds no saved state (a run stopped before its first checkpoint): its stats.jsonl is "
                f"started afresh")
        return cfg
    if not state_path.is_file():
        raise UserError(f"--resume: no {state_file} in {run} (a run stopped before its first checkpoint has nothing "
                        f"to continue: run the same command without --resume to start it afresh)")
    try:
        saved = json.loads((run / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"--resume: {run / 'config.json'} is missing or corrupt ({type(e).__name__}); "
                        f"the run cannot be continued as it was") from None
    if not isinstance(saved, dict):
        raise UserError(f"--resume: {run / 'config.json'} is corrupt (not a JSON object)")
    meta = state_metadata(state_path)
    if dist_info()[0] == 0:
        clean_stale_temps(run, log)
        # the log holds at most what the saved state has seen: a killed run logged steps after its last checkpoint
        for key in ("iteration", "step"):
            if isinstance(meta.get(key), int):
                truncate_log(run / "stats.jsonl", key, meta[key], notice=log)
                break
    given = dataclasses.asdict(cfg)
    free = tuple(free) + tuple(k for k in free_if_given if given.get(k) is not None)
    kept = {k: v for k, v in saved.items() if k not in free and k in given}
    # a setting newer than the run: the run was made without it, so its default (not this command's value) holds;
    # where that default has changed since, the value the run was made under (the config's LEGACY_DEFAULTS)
    legacy = getattr(type(cfg), "LEGACY_DEFAULTS", {})
    kept.update({f.name: legacy.get(f.name, f.default) for f in dataclasses.fields(cfg)
                 if f.name not in saved and f.name not in free and f.default is not dataclasses.MISSING})
    changed = [f"{k}={v}" for k, v in kept.items() if given[k] != v]
    if changed:
        log(f"--resume: keeping the run's own {', '.join(changed)}")
    return dataclasses.replace(cfg, **kept)


class GracefulStop:
    """Within `with GracefulStop() as stop:`, SIGINT/SIGTERM only set `stop.requested`, so the training loop can write
    its state and snapshot before leaving (a second signal interrupts at once). Under torchrun every rank agrees."""

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self):
        self.requested = False
        self._previous = {}

    def _handler(self, signum, frame):
        if self.requested:  # second signal: stop now
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                sig = getattr(signal, name)
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False

    def agreed(self, world: int, device) -> bool:
        """True once any rank was asked to stop."""
        if world == 1:
            return self.requested
        flag = torch.tensor([float(self.requested)], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())
