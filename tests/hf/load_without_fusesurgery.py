"""Run by tests/hf/test_export.py in a fresh process where fusesurgery cannot be imported:
load exported directories with transformers alone (``trust_remote_code=True``) and save what
they compute for the test to compare.

Usage: ``python load_without_fusesurgery.py INPUTS.pt RESULTS.pt DIR [DIR ...]``.
"""

import importlib.abc
import sys


class _NoFusesurgery(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "fusesurgery" or name.startswith("fusesurgery."):
            raise ImportError(f"{name} must not be imported here")


sys.meta_path.insert(0, _NoFusesurgery())

import torch  # noqa: E402
from transformers import AutoModelForImageTextToText  # noqa: E402


def _greedy_without_cache(model, ids, pixels, steps):
    for _ in range(steps):
        logits = model(input_ids=ids, pixel_values=pixels, use_cache=False).logits
        ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
    return ids


def main() -> None:
    inputs = torch.load(sys.argv[1], weights_only=True)
    results = {}
    for directory in sys.argv[3:]:
        model, info = AutoModelForImageTextToText.from_pretrained(
            directory, trust_remote_code=True, output_loading_info=True, dtype=torch.float32)
        model.eval()
        ids, text, pixels = inputs["ids"], inputs["text"], inputs["pixels"]
        with torch.no_grad():
            results[directory] = {
                "missing": sorted(info["missing_keys"]),
                "unexpected": sorted(info["unexpected_keys"]),
                "class": type(model).__name__,
                "logits": model(input_ids=ids, pixel_values=pixels).logits,
                "text_logits": model(input_ids=text).logits,
                "text_with_image_logits": model(input_ids=text, pixel_values=pixels).logits,
                "generated": model.generate(input_ids=ids, pixel_values=pixels,
                                            max_new_tokens=4, do_sample=False),
                "generated_text": model.generate(input_ids=text, pixel_values=pixels,
                                                 max_new_tokens=4, do_sample=False),
                "greedy_without_cache": _greedy_without_cache(model, ids, pixels, 4),
            }
    results["fusesurgery_imported"] = any(
        name == "fusesurgery" or name.startswith("fusesurgery.") for name in sys.modules)
    torch.save(results, sys.argv[2])


if __name__ == "__main__":
    main()
