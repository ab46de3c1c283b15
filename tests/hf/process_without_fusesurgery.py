"""Run by tests/hf/test_processor.py in a fresh process where fusesurgery cannot be imported:
load an exported directory's processor and model with transformers alone
(``trust_remote_code=True``), and save what they make of a text with an image.

Usage: ``python process_without_fusesurgery.py DIR RESULTS.pt``.
"""

import importlib.abc
import sys


class _NoFusesurgery(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "fusesurgery" or name.startswith("fusesurgery."):
            raise ImportError(f"{name} must not be imported here")


sys.meta_path.insert(0, _NoFusesurgery())

import torch  # noqa: E402
from transformers import AutoModelForImageTextToText, AutoProcessor  # noqa: E402


def main() -> None:
    directory, results = sys.argv[1], sys.argv[2]
    processor = AutoProcessor.from_pretrained(directory, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(directory, trust_remote_code=True,
                                                        dtype=torch.float32).eval()
    image = torch.randint(0, 256, (3, 40, 48), generator=torch.Generator().manual_seed(0),
                          dtype=torch.uint8)
    inputs = processor(images=[[image], []], text=["word5 <|image|> word42", "word7 word8"])
    with torch.no_grad():
        out = {"processor_class": type(processor).__name__,
               "inputs": dict(inputs),
               "logits": model(**inputs).logits,
               "generated": model.generate(**inputs, max_new_tokens=3, do_sample=False)}
    out["fusesurgery_imported"] = any(
        name == "fusesurgery" or name.startswith("fusesurgery.") for name in sys.modules)
    torch.save(out, results)


if __name__ == "__main__":
    main()
