"""gvr sub-commands of this package."""
