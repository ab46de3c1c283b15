"""Running a fused model: inputs from text and images, and generation.

``prepare_inputs`` / ``load_processor`` tokenize with the fused tokenizer, preprocess images
as the tower's ``preprocessor_config.json`` says and build the cross-attention mask and
labels; ``generate`` decodes greedily or by sampling with KV caches it sets up and tears down.
Needs the ``run`` extra (``tokenizers``, and Pillow for PIL images and image files).
"""

from fusesurgery._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "images": ["ImagePreprocessor", "load_image"],
    "inputs": ["IGNORE_INDEX", "FusedProcessor", "ModelInputs", "image_spans",
               "load_processor", "prepare_inputs"],
    "generation": ["GenerationOutput", "TextGeneration", "generate", "generate_text"],
})
