"""fusesurgery's fused models in the transformers ecosystem (after ``write`` in the flow).

``export_transformers`` writes a fused checkpoint as a transformers model directory;
``register_transformers`` registers its configuration and model classes with transformers'
Auto classes. transformers is imported only by what needs it.
"""

from __future__ import annotations

from typing import Any


def export_transformers(*args: Any, **kwargs: Any):
    """See :func:`fusesurgery.hf.export.export_transformers`."""
    from fusesurgery.hf.export import export_transformers as export  # noqa: PLC0415

    return export(*args, **kwargs)


def register_transformers() -> None:
    """Register the exported model's classes with transformers' ``AutoConfig``, ``AutoModel``
    and ``AutoModelForImageTextToText``, so an exported directory loads without
    ``trust_remote_code``. Imports transformers; calling it twice is harmless.

    Raises:
        ModuleNotFoundError: transformers is not installed.
    """
    from transformers import (  # noqa: PLC0415
        AutoConfig,
        AutoModel,
        AutoModelForImageTextToText,
    )

    from fusesurgery.hf.template.configuration_fusesurgery_fused import (  # noqa: PLC0415
        MODEL_TYPE,
        FusedVisionTextConfig,
    )
    from fusesurgery.hf.template.modeling_fusesurgery_fused import (  # noqa: PLC0415
        FusedVisionTextForConditionalGeneration,
    )

    AutoConfig.register(MODEL_TYPE, FusedVisionTextConfig, exist_ok=True)
    for auto in (AutoModel, AutoModelForImageTextToText):
        auto.register(FusedVisionTextConfig, FusedVisionTextForConditionalGeneration,
                      exist_ok=True)


__all__ = ["export_transformers", "register_transformers"]
