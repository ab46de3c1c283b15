"""``python -m fusesurgery``: the command line."""

from fusesurgery.cli import main

main()
