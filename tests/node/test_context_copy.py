"""Cheap per-association copies of the supported presentation contexts (issue 12)."""

from __future__ import annotations

import copy

from node.config import Settings
from node.context_copy import QuickCopyContext, quick_copying
from node.scp import build_ae


def test_quick_copying_deepcopy_equals_pynetdicoms_and_shares_no_list() -> None:
    """What each association gets: the same values as a generic deep copy, and lists of its own."""
    contexts = build_ae(Settings.model_validate({})).supported_contexts
    quick = quick_copying(contexts)
    copies = copy.deepcopy(quick)
    assert len(copies) == len(contexts) > 100
    for original, source, clone in zip(contexts, quick, copies, strict=True):
        assert isinstance(clone, QuickCopyContext) and clone is not source
        assert vars(clone) == vars(copy.deepcopy(original))
        for name, value in vars(clone).items():
            if isinstance(value, list):
                assert value is not getattr(source, name)
