"""A module imported on its first use: for a module that only some paths of its importer
need, so that the others (a cold start's audit tick) do not pay for importing it."""

from __future__ import annotations

import importlib
from typing import Any


class Deferred:
    """Stands for the module `name`, imported on the first attribute read. Thread-safe: the
    import system's per-module lock makes concurrent first reads import it once."""

    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        return getattr(importlib.import_module(self._name), attr)

    def __repr__(self) -> str:
        return f"<deferred module {self._name!r}>"
