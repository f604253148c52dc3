"""The ``gvr`` command: one entry point, one module per sub-command."""
