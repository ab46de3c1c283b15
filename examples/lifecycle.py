"""The life of a fused model, in Python: fuse the bundled checkpoints, load the result, train
the fusion a few steps, save it, validate it, and take the untouched decoder back out.

    .venv/bin/python examples/lifecycle.py [OUT_DIR]
"""

import sys
from pathlib import Path

import torch
from safetensors import safe_open

import fusesurgery

HERE = Path(__file__).parent
out = Path(sys.argv[1] if len(sys.argv) > 1 else "out/lifecycle")

# 1. fuse: a fusion layer before every 2nd decoder layer, <|image|> as a new token
fusesurgery.fuse(HERE / "tiny-clip-vision", HERE / "tiny-llama", out / "fused", every=2,
                 overwrite=True)

# 2. load: a DeepFusionModel on mmap-backed tensors; only the fusion parameters train
model = fusesurgery.load_fused(out / "fused")
trainable = [p for p in model.parameters() if p.requires_grad]
print(f"trainable: {sum(p.numel() for p in trainable)} of "
      f"{sum(p.numel() for p in model.parameters())} parameters", file=sys.stderr)

# 3. train a few steps on random images: prepare_inputs tokenizes each text, preprocesses its
#    image as the tower's preprocessor_config.json says, builds encoder_mask (each image is seen
#    from its token on) and the labels (-100 at <|image|> and padding; unshifted)
optimizer = torch.optim.AdamW(trainable, lr=1e-2)
generator = torch.Generator().manual_seed(0)
texts = ["word1 word2 <|image|> word7 word8 word9", "word3 <|image|> word4 word5"]
for step in range(5):
    images = [torch.rand(3, 40, 48, generator=generator) for _ in texts]  # [c, h, w] in [0, 1]
    batch = fusesurgery.prepare_inputs(model, texts, images)
    logits = model(**batch.model_kwargs())                                 # [b, s, v]
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1),
                                             batch.labels[:, 1:].flatten(), ignore_index=-100)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    print(f"step {step}: loss {loss.item():.3f}", file=sys.stderr)

# 4. save: same layout, fusion_config.json now says the fusion is trained
fusesurgery.save_fused(model, out / "trained", overwrite=True)

# 5. validate: every check passes, and the report says the identity no longer holds
report = fusesurgery.validate(out / "trained", against=HERE / "tiny-llama")
print(report.summary())
assert report.ok and report.identity is False

# 6. unfuse: the original decoder, bit for bit (its tensors never trained)
fusesurgery.unfuse(out / "trained", out / "decoder", overwrite=True)
with safe_open(HERE / "tiny-llama" / "model.safetensors", "pt") as a, \
        safe_open(out / "decoder" / "model.safetensors", "pt") as b:
    assert set(a.keys()) == set(b.keys())
    for key in a.keys():
        x, y = a.get_tensor(key), b.get_tensor(key)
        assert x.dtype == y.dtype and torch.equal(x.view(torch.uint8), y.view(torch.uint8)), key
print("unfused decoder: every tensor bitwise equal to examples/tiny-llama's")
