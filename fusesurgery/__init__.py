"""fusesurgery: model surgery on pretrained checkpoints.

Fuse a pretrained encoder into a pretrained LLM decoder with zero-initialised gated
cross-attention, keep the original checkpoint keys, prove the fused model still computes what
the decoder computed, and write the result as sharded safetensors.
"""

from __future__ import annotations

import sys
import types
from typing import TYPE_CHECKING, Any

# Public name -> (module, attribute). Imported on first access, so that ``import fusesurgery``
# (and with it the command line's ``--help``) does not pay for torch.
_LAZY_ATTRIBUTES: dict[str, tuple[str, str]] = {
    "DecoderConfig": ("fusesurgery.config", "DecoderConfig"),
    "FuseOptions": ("fusesurgery.surgery.fuse_plan", "FuseOptions"),
    "FuseSurgeryError": ("fusesurgery.errors", "FuseSurgeryError"),
    "FusionConfig": ("fusesurgery.config", "FusionConfig"),
    "RopeScaling": ("fusesurgery.config", "RopeScaling"),
    "VisionEncoderConfig": ("fusesurgery.config", "VisionEncoderConfig"),
    "detect_checkpoint": ("fusesurgery.surgery", "detect_checkpoint"),
    "export_transformers": ("fusesurgery.hf", "export_transformers"),
    "fuse": ("fusesurgery.hf.anyfamily", "fuse"),
    "generate": ("fusesurgery.run.generation", "generate"),
    "load_decoder": ("fusesurgery.surgery", "load_decoder"),
    "load_encoder": ("fusesurgery.surgery", "load_encoder"),
    "load_fused": ("fusesurgery.surgery.exported", "load_fused"),
    "load_processor": ("fusesurgery.run.inputs", "load_processor"),
    "prepare_inputs": ("fusesurgery.run.inputs", "prepare_inputs"),
    "read_fused_config": ("fusesurgery.surgery.exported", "read_any_fused_config"),
    "register_transformers": ("fusesurgery.hf", "register_transformers"),
    "save_fused": ("fusesurgery.write.save_fused", "save_fused"),
    "unfuse": ("fusesurgery.write.unfuse_checkpoint", "unfuse_checkpoint"),
    "validate": ("fusesurgery.validate", "validate_fused"),
}

if TYPE_CHECKING:
    from fusesurgery.config import DecoderConfig, FusionConfig, RopeScaling, VisionEncoderConfig
    from fusesurgery.errors import FuseSurgeryError
    from fusesurgery.hf import export_transformers, register_transformers
    from fusesurgery.hf.anyfamily import fuse
    from fusesurgery.run.generation import generate
    from fusesurgery.run.inputs import load_processor, prepare_inputs
    from fusesurgery.surgery import detect_checkpoint, load_decoder, load_encoder
    from fusesurgery.surgery.exported import load_fused
    from fusesurgery.surgery.exported import read_any_fused_config as read_fused_config
    from fusesurgery.surgery.fuse_plan import FuseOptions
    from fusesurgery.validate import validate_fused as validate
    from fusesurgery.write.save_fused import save_fused
    from fusesurgery.write.unfuse_checkpoint import unfuse_checkpoint as unfuse


def __getattr__(name: str) -> Any:
    """Imports a public attribute's module on first access (``fusesurgery.load_fused``)."""
    try:
        module_name, attribute = _LAZY_ATTRIBUTES[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    import importlib  # noqa: PLC0415

    value = getattr(importlib.import_module(module_name), attribute)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    """The public API and the module's dunders, not the helpers this file imports."""
    dunders = (name for name in globals() if name.startswith("__") and name.endswith("__"))
    return sorted({*dunders, *__all__})


class _Package(types.ModuleType):
    """``fusesurgery.validate`` is the function although a subpackage has that name too.

    Importing the subpackage makes Python set the package attribute of the same name; eager
    imports used to rebind it afterwards, and this property does so however lazily things
    are imported.
    """

    @property
    def validate(self) -> Any:
        return __getattr__("validate")

    @validate.setter
    def validate(self, submodule: types.ModuleType) -> None:
        pass  # the import system announcing fusesurgery/validate/: it stays in sys.modules


sys.modules[__name__].__class__ = _Package


from fusesurgery._version import __version__  # noqa: E402 - after the class swap above
from fusesurgery.hf.autoregister import install as _install_auto_registration  # noqa: E402

# transformers' Auto classes learn the exported model's classes as soon as transformers imports
# them (at once where it has), so an export loads without trust_remote_code; imports neither
_install_auto_registration()

__all__ = [
    "DecoderConfig",
    "FuseOptions",
    "FuseSurgeryError",
    "FusionConfig",
    "RopeScaling",
    "VisionEncoderConfig",
    "__version__",
    "detect_checkpoint",
    "export_transformers",
    "fuse",
    "generate",
    "load_decoder",
    "load_encoder",
    "load_fused",
    "load_processor",
    "prepare_inputs",
    "read_fused_config",
    "register_transformers",
    "save_fused",
    "unfuse",
    "validate",
]
