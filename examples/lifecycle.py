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
config = model.fused_config
image_id = config.new_tokens[0].id
trainable = [p for p in model.parameters() if p.requires_grad]
print(f"trainable: {sum(p.numel() for p in trainable)} of "
      f"{sum(p.numel() for p in model.parameters())} parameters", file=sys.stderr)

# 3. train a few steps on random data: "<text> <|image|> <text>", the image attended to only
#    from the image token on
optimizer = torch.optim.AdamW(trainable, lr=1e-2)
generator = torch.Generator().manual_seed(0)
size = config.encoder.image_size
for step in range(5):
    tokens = torch.randint(0, config.decoder.vocab_size, (2, 10), generator=generator)
    tokens[:, 3] = image_id
    images = torch.randn(2, 3, size, size, generator=generator)
    mask = torch.zeros(2, 10, config.encoder.seq_len, dtype=torch.bool)
    mask[:, 3:] = True
    logits = model(tokens, encoder_input={"images": images}, encoder_mask=mask)
    targets = tokens[:, 1:].clamp(max=config.decoder.vocab_size - 1)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten())
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
