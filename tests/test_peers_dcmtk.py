"""dcmtk's tools resolve to dcmtk even with ``.venv/bin`` (pynetdicom's same-named apps) first in PATH."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from benchmarks import ingest
from tests.peers import require_tool
from tests.peers_dcmtk import DcmtkNotFound, dcmtk_tool, names_dcmtk

VENV_BIN = Path(sys.prefix) / "bin"


def _script(path: Path, version_line: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\necho '{version_line}'\n")
    path.chmod(0o755)
    return path


@pytest.mark.parametrize("name", ["storescu", "storescp", "echoscu"])
def test_dcmtk_tool_skips_pynetdicom_apps_with_venv_bin_first(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``.venv/bin`` first in PATH the tool is still dcmtk's, outside the venv, and says so."""
    impostor = VENV_BIN / name
    if not impostor.is_file():
        pytest.skip(f"no {impostor} to shadow dcmtk (pynetdicom installs it)")
    monkeypatch.setenv("PATH", f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', os.defpath)}")
    resolved = Path(require_tool(name, "dcmtk"))
    assert resolved.parent.resolve() != VENV_BIN.resolve() and resolved.is_absolute()
    assert names_dcmtk(str(resolved)) and not names_dcmtk(str(impostor))


def test_dcmtk_tool_rejects_venvs_and_impostors_and_names_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A storescu in a folder next to a pyvenv.cfg, or one that is not dcmtk, is passed over; else a clear error."""
    venv = tmp_path / "other-venv"
    (venv / "pyvenv.cfg").parent.mkdir()
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\n")
    _script(venv / "bin" / "storescu", "$dcmtk: storescu v3.6.7 $")  # claims dcmtk, but lives in a venv
    _script(tmp_path / "other" / "storescu", "pynetdicom 3.0")
    real = _script(tmp_path / "system" / "storescu", "$dcmtk: storescu v3.6.7 2022-04-22 $")
    dirs = [venv / "bin", tmp_path / "other"]
    monkeypatch.setenv("PATH", os.pathsep.join(map(str, [*dirs, real.parent])))
    assert dcmtk_tool("storescu") == str(real)
    monkeypatch.setenv("PATH", os.pathsep.join(map(str, dirs)))
    with pytest.raises(DcmtkNotFound, match="apt-get install dcmtk") as caught:
        dcmtk_tool("storescu")
    assert str(tmp_path / "other" / "storescu") in str(caught.value)


def test_bench_ingest_refuses_without_dcmtk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``benchmarks.ingest`` will not time pynetdicom's storescp in dcmtk's place: it exits 2 naming the package."""
    monkeypatch.setenv("PATH", f"{VENV_BIN}{os.pathsep}{tmp_path}")
    assert ingest.main(["--quick"]) == 2
    assert "apt-get install dcmtk" in capsys.readouterr().err
