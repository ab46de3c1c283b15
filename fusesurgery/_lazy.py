"""Package attributes imported on first use (PEP 562), so that importing one light submodule
(``fusesurgery.io.tensor_info``, ``fusesurgery.reports.formatting``) does not import every
sibling its package ``__init__`` re-exports, and the command line starts without them."""

from __future__ import annotations

import gc
import importlib
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any


def lazy_exports(package: str, modules: Mapping[str, Sequence[str]]
                 ) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """``(__getattr__, __dir__, __all__)`` for a package that re-exports names of its
    submodules.

    Args:
        package: the package's ``__name__``.
        modules: submodule name (relative, e.g. ``"checkpoint"``) -> the names it exports.

    Returns:
        The module-level ``__getattr__`` (imports the submodule on first access and caches the
        value in the package), ``__dir__``, and ``__all__``.
    """
    where = {name: module for module, names in modules.items() for name in names}

    def __getattr__(name: str) -> Any:
        try:
            module = where[name]
        except KeyError:
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        setattr(sys.modules[package], name, value)  # later lookups are plain attributes
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *where})

    return __getattr__, __dir__, sorted(where)


@contextmanager
def first_torch_import() -> Iterator[None]:
    """A block that imports torch for the first time in this process, with the cyclic garbage
    collector paused, then everything alive frozen (``gc.freeze``: kept out of every later
    collection, the one at interpreter exit included).

    torch's import makes about 150,000 objects that live as long as the process and leaves
    no cycles worth collecting, yet each full collection on the way walks all of them again:
    on the 2-core development VM about 0.4-0.6 s of CPU during the import (three full
    collections) and 0.2-0.3 s more at exit, time a ``fuse`` whose copies already run spends
    waiting for its first new tensor. The freeze happens once per process (where torch is
    already imported the block does nothing), so at most the garbage alive at that moment
    outlives its cycles.
    """
    if "torch" in sys.modules:
        yield
        return
    paused = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if paused:
            gc.enable()
