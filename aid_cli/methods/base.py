"""Method base class and the registry every entry point (`inpaint`, `train`, `bench`) looks methods up in."""

from __future__ import annotations

from ..errors import UserError
from ..sampling.heun import Method

METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available under its `name`."""
    METHODS[cls.name] = cls
    return cls


def check_method_name(name: str) -> None:
    """An unknown name is a user error listing the known ones."""
    if name not in METHODS:
        raise UserError(f"unknown method {name!r} (available: {', '.join(sorted(METHODS))})")
    METHODS[name].check_available()  # a missing optional extra: one line, before anything is loaded


def get_method(name: str, **params) -> Method:
    """Instantiate a registered method by name."""
    check_method_name(name)
    return METHODS[name](**params)


__all__ = ["Method", "METHODS", "register", "get_method", "check_method_name"]
