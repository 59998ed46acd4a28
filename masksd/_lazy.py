"""Lazy package exports (PEP 562): a package lists which module defines each public name, and the module
is imported when the name is first used. ``import masksd`` then costs nothing until a name is used, so
the scripts' ``--help`` and the torch-free configs (``masksd.config``, ``masksd.data.config``) load fast."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(namespace: dict[str, Any], modules: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for the package whose globals are ``namespace``: ``modules`` maps each
    exported name to the module that defines it. A name, once imported, is cached in the package."""
    package = namespace["__name__"]

    def __getattr__(name: str) -> Any:
        if name not in modules:
            try:  # a submodule, as an eager package would have bound it (``masksd.wrapper``)
                return importlib.import_module(f"{package}.{name}")
            except ModuleNotFoundError:
                raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        value = getattr(importlib.import_module(modules[name]), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(modules))

    return __getattr__, __dir__
