"""What fusion did to a model, as data: for reports, the demo and the CLI."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from fusesurgery.modules.fusion import FusionEmbedding, FusionLayer, get_fusion_params
from fusesurgery.modules.norms import TanhGate


@dataclass(frozen=True)
class FusionSummary:
    """Counts and places of a fused model's new parts.

    Attributes:
        fusion_layers: indices of decoder layers that carry a fusion layer.
        fusion_vocab_size: number of new embedding rows (0 without a ``FusionEmbedding``).
        num_parameters: every parameter.
        num_fusion_parameters: parameters declared by fusion modules.
        num_trainable_parameters: parameters with ``requires_grad``.
        gates: gate name -> ``scale`` value (0 means the gate passes nothing).
    """

    fusion_layers: tuple[int, ...]
    fusion_vocab_size: int
    num_parameters: int
    num_fusion_parameters: int
    num_trainable_parameters: int
    gates: dict[str, float]

    @property
    def is_identity(self) -> bool:
        """Every gate is exactly 0: the model computes what the original decoder computed."""
        return all(value == 0.0 for value in self.gates.values())


def fusion_summary(model: nn.Module) -> FusionSummary:
    """Summarise the fusion parts of ``model`` (a ``DeepFusionModel`` or a fused decoder)."""
    layers, vocab = [], 0
    for name, module in model.named_modules():
        if isinstance(module, FusionLayer):
            layers.append(int(name.rsplit(".", 1)[-1]))
        elif isinstance(module, FusionEmbedding):
            vocab = module.fusion_embedding.num_embeddings
    params = list(model.parameters())
    return FusionSummary(
        fusion_layers=tuple(sorted(layers)),
        fusion_vocab_size=vocab,
        num_parameters=sum(p.numel() for p in params),
        num_fusion_parameters=sum(p.numel() for p in get_fusion_params(model).values()),
        num_trainable_parameters=sum(p.numel() for p in params if p.requires_grad),
        gates={
            f"{name}.scale": module.scale.item()
            for name, module in model.named_modules()
            if isinstance(module, TanhGate)
        },
    )
