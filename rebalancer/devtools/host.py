"""The one piece of the Functions host that local runs need: indexing the app's functions.

`FunctionApp.get_functions()` builds the functions from their decorators and may run only once
per app (a second call fails: "does not have a unique function name"), as the host calls it
once at start. Tests, the demo, the chaos suite and the benchmarks share this index instead.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any


@functools.cache
def indexed_functions() -> Mapping[str, Any]:
    """`function name -> azure.functions Function` of `function_app.app`, built once."""
    from function_app import app

    return MappingProxyType({f.get_function_name(): f for f in app.get_functions()})


def user_function(name: str) -> Callable[..., Any]:
    """The decorated Python function behind a function name, as the host invokes it."""
    return indexed_functions()[name].get_user_function()
