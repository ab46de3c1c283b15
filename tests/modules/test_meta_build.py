"""Building a model on the meta device (what every load does before assign=True) draws no
values and pulls in none of torch's compiler stack (its meta normal_ imports torch._dynamo,
which costs seconds), and the real-device build still initialises as torch does."""

from __future__ import annotations

import subprocess
import sys

import torch

from fusesurgery.modules._init import embedding, normal_

SCRIPT = """
import sys, torch
from fusesurgery.config import FusionConfig, preset
from fusesurgery.modules import build_deep_fusion_model
with torch.device("meta"):
    model = build_deep_fusion_model(preset("tiny"), preset("tiny_clip"),
                                    FusionConfig(fusion_layers=(1,), encoder_dim=64))
assert all(p.is_meta for p in model.parameters())
assert model.decoder.layers[0].attn.pos_embeddings.cache.is_meta
print("torch._dynamo" in sys.modules)
"""


def test_meta_build_imports_no_compiler():
    run = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "False"


def test_real_device_initialisation_is_torchs():
    torch.manual_seed(0)
    ours = embedding(10, 4).weight.detach().clone()
    torch.manual_seed(0)
    assert torch.equal(ours, torch.nn.Embedding(10, 4).weight.detach())
    torch.manual_seed(1)
    drawn = normal_(torch.empty(3, 5), std=0.5)
    torch.manual_seed(1)
    assert torch.equal(drawn, torch.nn.init.normal_(torch.empty(3, 5), std=0.5))
    with torch.device("meta"):
        assert embedding(10, 4).weight.is_meta
