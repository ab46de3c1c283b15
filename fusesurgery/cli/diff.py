"""``fusesurgery diff``: compare two checkpoints. (placeholder, being written)"""

from __future__ import annotations

from fusesurgery.cli.options import CheckpointPath


def diff(a: CheckpointPath, b: CheckpointPath) -> None:
    """Compare two checkpoints."""
    raise NotImplementedError
