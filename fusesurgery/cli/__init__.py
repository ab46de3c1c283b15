"""Command-line interface: thin commands over the library, one file per command."""

from __future__ import annotations


def main() -> None:
    """Console-script entry point."""
    from fusesurgery.cli.app import app
    from fusesurgery.cli.errors import handle_termination

    handle_termination()
    app()
