"""Planning SigLIP's pooling head from metadata alone: which keys are the head, how a damaged
one is refused, and that its shapes are transformers' (checked on a so400m-shaped head)."""

import pytest
import torch

from fusesurgery.config import VISION_PRESETS
from fusesurgery.convert.pooling_head import HEAD_PREFIX, head_shapes, plan_pooling_head
from fusesurgery.errors import ConfigError, ShapeError
from fusesurgery.io.tensor_info import TensorInfo

SO400M = VISION_PRESETS["siglip_so400m_384"]


def _infos(shapes, prefix="", dtype=torch.float32):
    return {prefix + key: TensorInfo(prefix + key, shape, dtype) for key, shape in shapes.items()}


def test_head_shapes_are_transformers():
    import transformers as tf

    config = tf.SiglipVisionConfig(hidden_size=48, intermediate_size=80, num_attention_heads=4,
                                   num_hidden_layers=1, image_size=16, patch_size=8)
    with torch.device("meta"):
        model = tf.SiglipVisionModel(config)
    theirs = {("vision_model." + key if not key.startswith("vision_model.") else key):
              tuple(tensor.shape) for key, tensor in model.state_dict().items() if "head." in key}
    ours = head_shapes(SO400M.replace(embed_dim=48, intermediate_dim=80))
    assert ours == theirs


@pytest.mark.parametrize("spelling", ["bare", "prefixed"])
def test_plan_picks_the_head_and_names_it_as_transformers(spelling):
    shapes = {key.removeprefix(HEAD_PREFIX): shape for key, shape in head_shapes(SO400M).items()}
    prefix = "head." if spelling == "bare" else HEAD_PREFIX
    tensors = {"vision_model.post_layernorm.weight": TensorInfo(
        "vision_model.post_layernorm.weight", (1152,), torch.float32), **_infos(shapes, prefix)}
    entries = plan_pooling_head(tensors, SO400M, origin="x", dtype=torch.bfloat16)
    assert [entry.target_key for entry in entries] == list(head_shapes(SO400M))
    assert {entry.dtype for entry in entries} == {torch.bfloat16}
    assert entries[0].shape == (1, 1, 1152) and entries[7].shape == (4304, 1152)
    assert plan_pooling_head(tensors, SO400M.replace(family="clip"), origin="x") == ()
    assert plan_pooling_head({}, SO400M, origin="x") == ()


def test_damaged_heads_are_refused():
    full = _infos(head_shapes(SO400M))
    half = dict(list(full.items())[:5])
    with pytest.raises(ConfigError, match=r"x: the SigLIP pooling head lacks .*layernorm"):
        plan_pooling_head(half, SO400M, origin="x")
    stray = {**full, "conv.weight": TensorInfo("conv.weight", (1,), torch.float32)}
    with pytest.raises(ConfigError, match="1 keys of no SigLIP pooling head: conv.weight"):
        plan_pooling_head(stray, SO400M, origin="x", head_only=True)
    extra = {**full, HEAD_PREFIX + "bonus": TensorInfo(HEAD_PREFIX + "bonus", (1,), torch.float32)}
    with pytest.raises(ConfigError, match="unknown tensors vision_model.head.bonus"):
        plan_pooling_head(extra, SO400M, origin="x")
    with pytest.raises(ShapeError, match="floating point"):
        plan_pooling_head(_infos(head_shapes(SO400M), dtype=torch.int32), SO400M, origin="x")
