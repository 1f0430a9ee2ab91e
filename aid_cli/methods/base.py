"""Method base class, the registry every entry point (`inpaint`, `train`, `bench`) looks methods up in, and the one
vocabulary of method names they all accept (parse_method)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError
from ..sampling.heun import Method

METHODS: dict[str, type[Method]] = {}

# Operating points: a name that fixes a registered method and its number of steps N (NFE = 2N - 1).
OPERATING_POINTS: dict[str, tuple[str, int]] = {
    "aid-12": ("aid", 12),
    "aid-18": ("aid", 18),
}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available under its `name`."""
    METHODS[cls.name] = cls
    return cls


@dataclass(frozen=True)
class MethodName:
    """A method as written on a command line: `dps`, `aid-18` (method aid at N = 18), `aid-18:NAME` (with the
    guidance module named NAME)."""

    label: str  # as written
    method: str  # the registered method
    steps: int | None = None  # N fixed by an operating point; None: the command's --steps
    variant: str | None = None  # AID: the guidance module's name after ':'

    def steps_for(self, given: int | None, default: int = 18) -> int:
        """N for one method (`aid inpaint`): the operating point's, --steps, else `default`; both differing is an
        error."""
        if self.steps is not None and given is not None and given != self.steps:
            raise UserError(f"--method {self.label} runs N = {self.steps} steps, but --steps {given} was given; drop "
                            f"--steps, or use --method {self.method} --steps {given}")
        return self.steps or given or default


def known_names() -> list[str]:
    return sorted(METHODS) + sorted(OPERATING_POINTS)


def parse_method(label: str) -> MethodName:
    """The one parser of method names (`aid inpaint --method`, `aid bench --methods`, `aid methods`): a registered
    method or an operating point, with `:NAME` for AID only. Unknown names are one line with the closest known name;
    a method whose optional extra is missing fails here, before anything is loaded."""
    import difflib

    base, sep, variant = label.partition(":")
    if base in OPERATING_POINTS:
        method, steps = OPERATING_POINTS[base]
    elif base in METHODS:
        method, steps = base, None
    else:
        close = difflib.get_close_matches(base, known_names(), n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise UserError(f"unknown method {base!r}: {hint}available: {', '.join(known_names())} (`aid methods`)")
    if sep and method != "aid":
        raise UserError(f"only AID takes a guidance variant (aid-18:NAME), got {label}")
    if sep and not variant:
        raise UserError(f"{label}: name the guidance module after ':' (aid-18:NAME)")
    METHODS[method].check_available()  # a missing optional extra: one line, before anything is loaded
    return MethodName(label, method, steps, variant if sep else None)


def get_method(name: str, **params) -> Method:
    """Instantiate a registered method by name (an operating point's name gives its method)."""
    return METHODS[parse_method(name).method](**params)


__all__ = ["Method", "METHODS", "OPERATING_POINTS", "MethodName", "register", "get_method", "parse_method",
           "known_names"]
