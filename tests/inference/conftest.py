"""One bundle per test session: the committed demo bundle, else a tiny one trained here.

The tiny one (32 px, a 16-dimensional latent, 8-channel networks) is trained on
phantoms with the real training commands in about 15 s and is good enough for
what the inference tests check (the optimisation moves the classifier, stays
near the decoding, runs in a worker). ``GVR_TEST_BUNDLE=DIR`` picks a bundle;
``GVR_TEST_BUNDLE=train`` forces the tiny one.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from inference.bundle import DEMO_BUNDLE, MANIFEST_FILE, Bundle, load_bundle

TINY_DATA = "phantoms:0-239@64"


def _train_tiny_bundle(root: Path) -> Path:
    from training.cli import export as export_cli
    from training.cli import train as train_cli

    common = ["--threads", "1"]
    steps = [
        ["generator", "--data", TINY_DATA, "--resolution", "32", "--latent", "16", "--channels", "8",
         "--steps", "60", "--batch", "16", "--lr", "1e-3", "--checkpoint-every", "60", "--out", str(root / "g")],
        ["encoder", "--generator", str(root / "g"), "--data", TINY_DATA, "--steps", "150", "--batch", "16",
         "--lr", "2e-3", "--channels", "8", "--image-weight", "5", "--checkpoint-every", "150",
         "--out", str(root / "e")],
        ["classifier", "--labels", TINY_DATA, "--encoder", str(root / "e"), "--generator", str(root / "g"),
         "--epochs", "200", "--out", str(root / "c")],
    ]
    for argv in steps:
        if train_cli.main(argv + common) != 0:
            raise RuntimeError(f"gvr train {argv[0]} failed")
    bundle = root / "bundle"
    if export_cli.main(["--generator", str(root / "g"), "--encoder", str(root / "e"), "--classifier",
                        str(root / "c"), "--out", str(bundle), "--name", "tiny", "--version", "0.0.1"]) != 0:
        raise RuntimeError("gvr export failed")
    return bundle


@pytest.fixture(scope="session")
def tiny_bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle folder: ``GVR_TEST_BUNDLE``, the demo bundle, or one trained once for the session."""
    given = os.environ.get("GVR_TEST_BUNDLE", "")
    if given and given != "train":
        return Path(given)
    if not given and (DEMO_BUNDLE / MANIFEST_FILE).is_file():
        return DEMO_BUNDLE
    before = torch.get_num_threads()
    try:
        return _train_tiny_bundle(tmp_path_factory.mktemp("tiny-bundle"))
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_bundle(tiny_bundle_dir: Path) -> Bundle:
    return load_bundle(tiny_bundle_dir)
