"""Key maps, tensor transforms, conversion plans and architecture detection.

Everything here works from checkpoint metadata (``{name: TensorInfo}``) and parsed config
dicts; only :func:`apply_plan_entry` / :func:`plan_entry_value` / :func:`apply_plan` touch tensor
values.
"""

from fusesurgery._lazy import lazy_exports

# submodule -> the names this package re-exports from it, imported on first use
__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "configs": [
        "ConfigReading", "config_style", "meta_intermediate_dim", "read_decoder_config",
        "read_vision_config",
    ],
    "detect": ["DECODER_FLAGS", "VISION_FLAGS", "DetectedModel", "detect_layout", "detect_model"],
    "keymaps": [
        "DROPPED_KEYS", "HF_DECODER_TO_NATIVE", "HF_VISION_TO_NATIVE", "META_DECODER_TO_NATIVE",
        "NATIVE_DECODER_KEYS", "NATIVE_FUSION_KEYS", "NATIVE_VISION_KEYS", "KeyMapping",
        "from_native_key", "invert_key_map", "keys_from_native", "keys_to_native", "to_native_key",
        "to_native_parts", "stacked_key",
    ],
    "plan": [
        "ConversionPlan", "PlanEntry", "apply_plan", "apply_plan_entry", "check_native_shapes",
        "expected_native_shapes", "layout_tensor_infos", "plan_conversion", "plan_entry_value",
    ],
    "transforms": [
        "TRANSFORMS", "apply_transform", "permute_qk_from_native", "permute_qk_to_native",
        "stack_rows", "take_rows",
    ],
})
