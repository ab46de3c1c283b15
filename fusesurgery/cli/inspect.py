"""``fusesurgery inspect``: what is this checkpoint? (placeholder, being written)"""

from __future__ import annotations

from fusesurgery.cli.options import CheckpointPath


def inspect(path: CheckpointPath) -> None:
    """Describe a checkpoint."""
    raise NotImplementedError
