"""The configuration and modeling files ``convert --to transformers`` copies into its output.

They import only torch and transformers (never fusesurgery), so that the exported directory
loads with ``trust_remote_code=True`` where fusesurgery is not installed; the same modules
are what :func:`fusesurgery.register_transformers` registers with the Auto classes.
"""
