"""fusesurgery's fused models in the transformers ecosystem (after ``write`` in the flow).

``export_transformers`` writes a fused checkpoint as a transformers model directory;
``register_transformers`` registers its configuration and model classes with transformers'
Auto classes. transformers is imported only by what needs it.
"""

from __future__ import annotations

from typing import Any

# torch-free, as this package's own import is: the command line tells an export apart with them
from fusesurgery.surgery.export_layout import (
    EXPORT_MODEL_TYPE,
    EXPORT_TARGET,
    is_export_directory,
)


def export_transformers(*args: Any, **kwargs: Any):
    """See :func:`fusesurgery.hf.export.export_transformers`."""
    from fusesurgery.hf.export import export_transformers as export  # noqa: PLC0415

    return export(*args, **kwargs)


def import_transformers(*args: Any, **kwargs: Any):
    """See :func:`fusesurgery.hf.reimport.import_transformers`."""
    from fusesurgery.hf.reimport import import_transformers as reimport  # noqa: PLC0415

    return reimport(*args, **kwargs)


def unfuse_export(*args: Any, **kwargs: Any):
    """See :func:`fusesurgery.hf.reimport.unfuse_export`."""
    from fusesurgery.hf.reimport import unfuse_export as unfuse  # noqa: PLC0415

    return unfuse(*args, **kwargs)


def register_transformers() -> None:
    """Register the exported model's classes with transformers' ``AutoConfig``, ``AutoModel``,
    ``AutoModelForImageTextToText`` and ``AutoProcessor``, so an exported directory loads
    without ``trust_remote_code``. Imports transformers; calling it twice is harmless.

    ``import fusesurgery`` does the same by itself as soon as transformers' auto modules are
    imported (:mod:`fusesurgery.hf.autoregister`); this call is for doing it now.

    Raises:
        ModuleNotFoundError: transformers is not installed.
    """
    from fusesurgery.hf.autoregister import (  # noqa: PLC0415
        register_config,
        register_models,
        register_processor,
    )
    from fusesurgery.hf.template.configuration_fusesurgery_fused import (  # noqa: PLC0415
        FusedVisionTextConfig,
    )
    from fusesurgery.hf.template.modeling_fusesurgery_fused import (  # noqa: PLC0415
        FusedVisionTextForConditionalGeneration,
    )

    register_config()
    register_models()
    register_processor()
    # save_pretrained then writes the configuration and modeling files beside the weights (and
    # config.json's auto_map to them), as a model loaded with remote code does: a model
    # trained here and saved still loads with transformers alone
    FusedVisionTextConfig.register_for_auto_class()
    FusedVisionTextForConditionalGeneration.register_for_auto_class(
        "AutoModelForImageTextToText")


__all__ = ["EXPORT_MODEL_TYPE", "EXPORT_TARGET", "export_transformers", "import_transformers",
           "is_export_directory", "register_transformers", "unfuse_export"]
