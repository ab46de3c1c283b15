import pytest
import torch
from torch import nn

from fusesurgery.modules import FusionEmbedding
from fusesurgery.testing import reference_fusion_embedding_forward


@pytest.fixture
def emb():
    torch.manual_seed(0)
    return FusionEmbedding(vocab_size=50, fusion_vocab_size=5, embed_dim=8)


def tokens_with_new_ids(b=3, s=17, vocab=50, fusion=5):
    tokens = torch.randint(0, vocab + fusion, (b, s))
    tokens[0, 0], tokens[1, 1], tokens[2, 2] = vocab, vocab + fusion - 1, vocab - 1
    return tokens


def test_matches_reference_formulation(emb):
    tokens = tokens_with_new_ids()
    assert torch.equal(emb(tokens), reference_fusion_embedding_forward(emb, tokens))
    only_old = torch.randint(0, 50, (2, 5))
    assert torch.equal(emb(only_old), emb.embedding(only_old))
    assert emb.num_embeddings == 55 and emb.fusion_params() == ["fusion_embedding.weight"]


def test_gradients_reach_only_used_rows(emb):
    tokens = torch.tensor([[50, 3, 52]])
    emb(tokens).sum().backward()
    fusion_grad_rows = emb.fusion_embedding.weight.grad.abs().sum(-1).nonzero().flatten()
    assert fusion_grad_rows.tolist() == [0, 2]
    assert emb.embedding.weight.grad.abs().sum(-1).nonzero().flatten().tolist() == [3]


def test_state_dict_keys_and_round_trip(emb):
    sd = emb.state_dict()
    assert list(sd) == ["weight", "fusion_embedding.weight"]
    other = FusionEmbedding(50, 5, 8)
    other.load_state_dict(sd)
    assert torch.equal(other.embedding.weight, emb.embedding.weight)
    assert torch.equal(other.fusion_embedding.weight, emb.fusion_embedding.weight)
    # the original nn.Embedding's checkpoint loads into it
    plain = nn.Embedding(50, 8)
    result = other.load_state_dict(plain.state_dict(), strict=False)
    assert result.missing_keys == ["fusion_embedding.weight"] and not result.unexpected_keys
    assert torch.equal(other.embedding.weight, plain.weight)


def test_loading_only_the_fusion_table_works(emb):
    """The reference's load hook raised KeyError here."""
    other = FusionEmbedding(50, 5, 8)
    result = other.load_state_dict(
        {"fusion_embedding.weight": emb.fusion_embedding.weight}, strict=False
    )
    assert result.missing_keys == ["weight"] and result.unexpected_keys == []
    assert torch.equal(other.fusion_embedding.weight, emb.fusion_embedding.weight)


def test_merged_is_one_plain_table_with_identical_outputs(emb):
    merged = emb.merged()
    assert type(merged) is nn.Embedding and merged.num_embeddings == 55
    assert list(merged.state_dict()) == ["weight"]
    tokens = tokens_with_new_ids()
    assert torch.equal(merged(tokens), emb(tokens))


class ReferenceEmbedding(nn.Module):
    def __init__(self, emb: FusionEmbedding) -> None:
        super().__init__()
        self.emb = emb

    def forward(self, tokens):
        return reference_fusion_embedding_forward(self.emb, tokens)


def data_dependent_shapes(module: nn.Module, tokens: torch.Tensor) -> list[str]:
    """Nodes of the exported graph whose shape is an unbacked symbol (known only at run time,
    which on GPU means a device-to-host sync)."""
    graph = torch.export.export(module, (tokens,)).graph
    return [
        node.name
        for node in graph.nodes
        if isinstance(val := node.meta.get("val"), torch.Tensor)
        and not all(isinstance(dim, int) for dim in val.shape)
    ]


def test_fullgraph_compile_and_export(emb):
    tokens = tokens_with_new_ids()
    expected = emb(tokens)
    torch._dynamo.reset()
    compiled = torch.compile(emb, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(tokens), expected)
    exported = torch.export.export(emb, (tokens,))
    assert torch.equal(exported.module()(tokens), expected)


def test_every_shape_is_static_unlike_the_reference(emb):
    tokens = tokens_with_new_ids()
    assert data_dependent_shapes(emb, tokens) == []
    # The reference formulation's intermediate shapes depend on the token values.
    assert data_dependent_shapes(ReferenceEmbedding(emb), tokens)
