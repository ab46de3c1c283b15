"""Key maps, tensor transforms, conversion plans and architecture detection.

Everything here works from checkpoint metadata (``{name: TensorInfo}``) and parsed config
dicts; only :func:`apply_plan_entry` / :func:`apply_plan` touch tensor values.
"""

from fusesurgery.convert.configs import (
    ConfigReading,
    config_style,
    meta_intermediate_dim,
    read_decoder_config,
    read_vision_config,
)
from fusesurgery.convert.detect import (
    DECODER_FLAGS,
    VISION_FLAGS,
    DetectedModel,
    detect_layout,
    detect_model,
)
from fusesurgery.convert.keymaps import (
    DROPPED_KEYS,
    HF_DECODER_TO_NATIVE,
    HF_VISION_TO_NATIVE,
    META_DECODER_TO_NATIVE,
    NATIVE_DECODER_KEYS,
    NATIVE_FUSION_KEYS,
    NATIVE_VISION_KEYS,
    KeyMapping,
    from_native_key,
    invert_key_map,
    keys_from_native,
    keys_to_native,
    to_native_key,
)
from fusesurgery.convert.plan import (
    ConversionPlan,
    PlanEntry,
    apply_plan,
    apply_plan_entry,
    check_native_shapes,
    expected_native_shapes,
    layout_tensor_infos,
    plan_conversion,
)
from fusesurgery.convert.transforms import (
    TRANSFORMS,
    apply_transform,
    permute_qk_from_native,
    permute_qk_to_native,
)

__all__ = [
    "DECODER_FLAGS",
    "DROPPED_KEYS",
    "HF_DECODER_TO_NATIVE",
    "HF_VISION_TO_NATIVE",
    "META_DECODER_TO_NATIVE",
    "NATIVE_DECODER_KEYS",
    "NATIVE_FUSION_KEYS",
    "NATIVE_VISION_KEYS",
    "TRANSFORMS",
    "VISION_FLAGS",
    "ConfigReading",
    "ConversionPlan",
    "DetectedModel",
    "KeyMapping",
    "PlanEntry",
    "apply_plan",
    "apply_plan_entry",
    "apply_transform",
    "check_native_shapes",
    "config_style",
    "detect_layout",
    "detect_model",
    "expected_native_shapes",
    "from_native_key",
    "invert_key_map",
    "keys_from_native",
    "keys_to_native",
    "layout_tensor_infos",
    "meta_intermediate_dim",
    "permute_qk_from_native",
    "permute_qk_to_native",
    "plan_conversion",
    "read_decoder_config",
    "read_vision_config",
    "to_native_key",
]
