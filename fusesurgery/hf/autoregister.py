"""``import fusesurgery`` registers the exported model's classes with transformers' Auto
classes, without importing transformers (or torch) itself.

Where transformers' auto modules are already imported, :func:`install` registers at once.
Otherwise it puts a finder in front of ``sys.meta_path`` that answers only for
``transformers`` and its submodules, and for the exported model's own template modules (they
import transformers, and registering imports them): it wraps their loaders, and when the
outermost such import in progress has finished (so none of those modules is half-initialised
and the registration's own imports cannot meet one), it registers each Auto group whose
module is now imported: ``AutoConfig`` once ``configuration_auto`` is, ``AutoModel`` /
``AutoModelForImageTextToText`` once ``modeling_auto`` is, ``AutoProcessor`` once
``processing_auto`` is. When all three are done it leaves ``sys.meta_path``. Every other import
costs one ``str.startswith``.

transformers (5.x) prefers a class registered this way to a directory's own code even with
``trust_remote_code=True``; the environment variable ``FUSESURGERY_NO_AUTO_REGISTER=1`` turns the
registration off, so that an export's own (perhaps edited) code files load instead.
"""

from __future__ import annotations

import _thread  # not threading: import fusesurgery stays as cheap as it was
import os
import sys
import warnings
from collections.abc import Callable
from types import ModuleType
from typing import Any

TRANSFORMERS = "transformers"
_AUTO = "transformers.models.auto."
CONFIGURATION_AUTO = _AUTO + "configuration_auto"
MODELING_AUTO = _AUTO + "modeling_auto"
PROCESSING_AUTO = _AUTO + "processing_auto"
OPT_OUT = "FUSESURGERY_NO_AUTO_REGISTER"
# the modules registering imports: transformers' and our exported model's own. Registering
# while one of ours is half-imported (its import is what imported transformers) would meet it
# half-initialised, so their imports count as in progress too.
TEMPLATE = "fusesurgery.hf.template"
WATCHED = (TRANSFORMERS, TEMPLATE)


def register_config() -> None:
    """``AutoConfig``: the export's ``model_type`` is our configuration class."""
    from transformers.models.auto.configuration_auto import AutoConfig  # noqa: PLC0415

    from fusesurgery.hf.template.configuration_fusesurgery_fused import (  # noqa: PLC0415
        MODEL_TYPE,
        FusedVisionTextConfig,
    )

    AutoConfig.register(MODEL_TYPE, FusedVisionTextConfig, exist_ok=True)


def register_models() -> None:
    """``AutoModel`` and ``AutoModelForImageTextToText`` (what the export's ``auto_map`` names):
    our configuration class builds our model class."""
    from transformers.models.auto.modeling_auto import (  # noqa: PLC0415
        AutoModel,
        AutoModelForImageTextToText,
    )

    from fusesurgery.hf.template.configuration_fusesurgery_fused import (  # noqa: PLC0415
        FusedVisionTextConfig,
    )
    from fusesurgery.hf.template.modeling_fusesurgery_fused import (  # noqa: PLC0415
        FusedVisionTextForConditionalGeneration,
    )

    for auto in (AutoModel, AutoModelForImageTextToText):
        auto.register(FusedVisionTextConfig, FusedVisionTextForConditionalGeneration,
                      exist_ok=True)


def register_processor() -> None:
    """``AutoProcessor``: our configuration class's processor is ours."""
    from transformers.models.auto.processing_auto import AutoProcessor  # noqa: PLC0415

    from fusesurgery.hf.template.configuration_fusesurgery_fused import (  # noqa: PLC0415
        FusedVisionTextConfig,
    )
    from fusesurgery.hf.template.processing_fusesurgery_fused import (  # noqa: PLC0415
        FusedVisionTextProcessor,
    )

    AutoProcessor.register(FusedVisionTextConfig, FusedVisionTextProcessor, exist_ok=True)


# transformers' auto module -> what registers with its Auto classes once it is imported
GROUPS: dict[str, Callable[[], None]] = {
    CONFIGURATION_AUTO: register_config,
    MODELING_AUTO: register_models,
    PROCESSING_AUTO: register_processor,
}


def _initialised(name: str) -> bool:
    module = sys.modules.get(name)
    spec = getattr(module, "__spec__", None)
    return module is not None and not getattr(spec, "_initializing", False)


class _RegisteringLoader:
    """A watched module's own loader, counting the watched imports in progress."""

    def __init__(self, loader: Any, finder: AutoRegisteringFinder) -> None:
        self._loader = loader
        self._finder = finder

    def create_module(self, spec: Any) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._finder.entered()
        executed = None
        try:
            self._loader.exec_module(module)
            executed = module.__name__
        finally:  # a failed import registers nothing of its own
            self._finder.left(executed)

    def __getattr__(self, name: str) -> Any:  # get_source, get_resource_reader, is_package...
        return getattr(self._loader, name)


class AutoRegisteringFinder:
    """Finds nothing itself: wraps the loader another finder gives a transformers module (or
    one of the exported model's template modules) so that the Auto groups register once the
    outermost such import has finished. (A plain class: ``importlib.abc`` would cost
    ``import fusesurgery`` the import of ``importlib.resources``.)"""

    def __init__(self) -> None:
        self.pending = dict(GROUPS)
        self._local = _thread._local()  # imports in progress in this thread
        self._lock = _thread.allocate_lock()
        self._registering = False

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if not name.startswith(WATCHED):
            return None
        if name.partition(".")[0] != TRANSFORMERS and not name.startswith(TEMPLATE):
            return None  # transformers_modules (remote code) and other look-alikes
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _RegisteringLoader(spec.loader, self)
        return spec

    def entered(self) -> None:
        self._local.depth = getattr(self._local, "depth", 0) + 1

    def left(self, name: str | None) -> None:
        self._local.depth -= 1
        if self._local.depth == 0:
            self.register_ready(executed=name)

    def register_ready(self, executed: str | None = None) -> None:
        """Register every pending group whose auto module is imported; leave
        ``sys.meta_path`` when none is pending.

        Args:
            executed: a module whose code has just run to its end (the import system marks
                it initialised only once this loader returns).
        """
        # another thread registering (its imports may wait on a module this thread is
        # loading, so never wait for it) or the registration's own imports finishing
        if self._registering or not self._lock.acquire(blocking=False):
            return
        self._registering = True
        try:
            for module, register in list(self.pending.items()):
                if module == executed or _initialised(module):
                    del self.pending[module]
                    try:
                        register()
                    except Exception as error:  # never break the user's own import
                        warnings.warn(f"fusesurgery could not register its exported model's "
                                      f"classes with transformers ({error}); call "
                                      "fusesurgery.register_transformers() to see why",
                                      ImportWarning, stacklevel=2)
        finally:
            self._registering = False
            self._lock.release()
        if not self.pending:
            uninstall()


def install() -> None:
    """Register what transformers has imported already and watch for the rest (see the
    module's docstring). Installing twice installs one finder; with ``FUSESURGERY_NO_AUTO_REGISTER``
    set to 1 it does nothing."""
    if os.environ.get(OPT_OUT, "") not in ("", "0"):
        return
    if any(isinstance(finder, AutoRegisteringFinder) for finder in sys.meta_path):
        return
    finder = AutoRegisteringFinder()
    sys.meta_path.insert(0, finder)
    if any(_initialised(module) for module in GROUPS):
        finder.register_ready()


def uninstall() -> None:
    """Take the finder out of ``sys.meta_path`` (what is registered stays registered)."""
    sys.meta_path[:] = [finder for finder in sys.meta_path
                        if not isinstance(finder, AutoRegisteringFinder)]


__all__ = ["AutoRegisteringFinder", "install", "register_config", "register_models",
           "register_processor", "uninstall"]
