"""deploy/: the compose file validates, the systemd units verify, the env example and Orthanc config work."""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from node.config import Settings, load_settings
from tests.peers_orthanc import Orthanc

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
REPO_ROOT = DEPLOY.parent
SERVICES = {"redis", "postgres", "node", "worker-gpu", "worker-dicom", "flower", "web", "orthanc"}
GVR_SERVICES = ("node", "worker-gpu", "worker-dicom", "flower", "web")
UNITS = ("gvr-node.service", "gvr-worker-gpu@.service", "gvr-worker-dicom.service", "gvr-flower.service",
         "gvr-web.service", "gvr-status.service", "gvr-status.timer")  # fmt: skip
SECRETS = {"POSTGRES_PASSWORD": "test-password", "FLOWER_BASIC_AUTH": "ops:test"}


def _compose_command() -> list[str]:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30, check=False).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    if legacy:
        return [legacy]
    pytest.skip("neither `docker compose` nor docker-compose found: apt-get install docker-compose")


def _compose_config(secrets: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`compose config` (Compose v2 or Debian's docker-compose 1.29) with only these secrets set."""
    env = {k: v for k, v in os.environ.items() if k not in SECRETS} | secrets
    command = [*_compose_command(), "-f", str(DEPLOY / "docker-compose.yml"), "config"]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=DEPLOY, env=env, check=False)


def test_compose_config_validates() -> None:
    """`compose config` accepts the file (no engine needed); every gvr service has a health check."""
    import yaml

    result = _compose_config(SECRETS)
    assert result.returncode == 0, result.stderr
    resolved: dict[str, Any] = yaml.safe_load(result.stdout)
    assert set(resolved["services"]) == SERVICES
    for name in GVR_SERVICES:
        test = " ".join(resolved["services"][name]["healthcheck"]["test"])
        assert "gvr status --check" in test or "/healthz" in test or "/healthcheck" in test, name
    assert "test-password" in resolved["services"]["node"]["environment"]["GVR_DATABASE_URL"]
    flower = resolved["services"]["flower"]
    assert flower["environment"]["FLOWER_BASIC_AUTH"] == "ops:test" and "ops:test" not in flower["command"]


@pytest.mark.parametrize("missing", sorted(SECRETS))
def test_compose_refuses_missing_secret(missing: str) -> None:
    """Without a secret, compose fails naming it and deploy/.env (no silent change-me password)."""
    result = _compose_config({k: v for k, v in SECRETS.items() if k != missing})
    assert result.returncode != 0
    assert missing in result.stderr and "deploy/.env" in result.stderr


def test_compose_device_per_role_and_secrets_ignored() -> None:
    """Only the GPU worker asks for CUDA (the env example forces no device); deploy/.env is git-ignored."""
    import yaml

    assert not re.search(r"^GVR_DEVICE=", (DEPLOY / "gvr.env.example").read_text(), flags=re.MULTILINE)
    services = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]
    for name in GVR_SERVICES:
        command = services[name]["command"]
        assert ("--device" in command) == (name == "worker-gpu"), name
    ignored = subprocess.run(["git", "check-ignore", "deploy/.env"], cwd=REPO_ROOT, capture_output=True, check=False)
    assert ignored.returncode == 0


def test_compose_gpu_worker_redis_and_ports() -> None:
    """The GPU worker reserves an NVIDIA GPU; Redis keeps an append-only file; monitoring ports stay local."""
    import yaml

    compose: dict[str, Any] = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    devices = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert "--appendonly" in services["redis"]["command"] and "yes" in services["redis"]["command"]
    assert services["node"]["environment"]["GVR_METRICS_PORT"] == "9464"
    assert all(port.startswith("127.0.0.1:") for port in services["flower"]["ports"])
    for role, queue in (("worker-gpu", "gpu"), ("worker-dicom", "dicom")):
        command = services[role]["command"]
        assert command[:2] == ["gvr", "worker"] and command[command.index("--queues") + 1] == queue


def _local_unit(unit: Path, folder: Path) -> Path:
    """The unit with paths that exist here (verify checks that ExecStart is executable)."""
    gvr = shutil.which("gvr", path=str(Path(__import__("sys").executable).parent)) or shutil.which("gvr")
    if gvr is None:
        pytest.skip("the gvr entry point is not installed: pip install -e .")
    text = unit.read_text().replace("/opt/gvr/venv/bin/gvr", gvr)
    text = text.replace("/etc/gvr/gvr.env", str(DEPLOY / "gvr.env.example"))
    name = unit.name.replace("@.service", "@0.service")
    path = folder / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", UNITS)
def test_systemd_unit_verifies(name: str, tmp_path: Path) -> None:
    """systemd-analyze verify: no error, no unknown key or section (parsed by hand without systemd)."""
    unit = DEPLOY / "systemd" / name
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(unit.read_text())
    assert {"Unit", "Install"} <= set(parser.sections()) or name == "gvr-status.service"
    if name.endswith(".service"):
        assert parser["Service"]["ExecStart"].startswith("/opt/gvr/venv/bin/gvr ")
        assert parser["Service"]["EnvironmentFile"] == "/etc/gvr/gvr.env"
        assert parser["Service"]["StateDirectory"] == "gvr"  # systemd creates /var/lib/gvr
    else:
        assert {"Timer"} <= set(parser.sections())
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not found (parsed only): apt-get install systemd")
    local = _local_unit(unit, tmp_path)
    if name.endswith(".timer"):  # a timer is verified with the service it starts
        _local_unit(DEPLOY / "systemd" / name.replace(".timer", ".service"), tmp_path)
    result = subprocess.run([analyze, "verify", local.name], capture_output=True, text=True, timeout=60,
                            cwd=tmp_path, check=False)  # fmt: skip
    complaints = [line for line in result.stderr.splitlines() if local.name in line or "Unknown" in line]
    assert result.returncode == 0 and complaints == [], result.stderr


def test_env_example_is_valid_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every GVR_* line of gvr.env.example names a real setting, and together they load."""
    values = {}
    for line in (DEPLOY / "gvr.env.example").read_text().splitlines():
        match = re.match(r"^#?\s*(GVR_[A-Z_]+)=(.*)$", line.strip())
        if match:
            name = match[1].removeprefix("GVR_").lower()
            assert name in Settings.model_fields, f"{match[1]} is not a setting"
            if not line.startswith("#"):
                values[match[1]] = match[2]
    for name in [n for n in __import__("os").environ if n.startswith("GVR_")]:
        monkeypatch.delenv(name)
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    settings = load_settings()
    assert settings.metrics_port == 9464 and settings.celery_broker_url.startswith("redis://")


def test_dockerfile_copies_every_package() -> None:
    """The image installs the packages pyproject ships (node, inference, training)."""
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    for package in ("node", "inference", "training"):
        assert f"COPY {package} ./{package}" in dockerfile
    assert 'pip install ".[monitor]"' in dockerfile


class DeployOrthanc(Orthanc):
    """Orthanc started from deploy/orthanc.json, with this test's ports and folders."""

    def config(self) -> dict[str, Any]:
        import json

        config: dict[str, Any] = json.loads((DEPLOY / "orthanc.json").read_text())
        config.update(DicomPort=self.dicom_port, HttpPort=self.http_port, RemoteAccessAllowed=False,
                      StorageDirectory=str(self.root / "storage"), IndexDirectory=str(self.root / "storage"))  # fmt: skip
        return config


def test_orthanc_json_starts_orthanc(tmp_path: Path) -> None:
    """deploy/orthanc.json holds every key the tests' Orthanc sets, and a real Orthanc starts with it."""
    import json

    deployed = json.loads((DEPLOY / "orthanc.json").read_text())
    assert set(Orthanc(tmp_path / "probe").config()) <= set(deployed)
    assert deployed["DicomModalities"]["gvr"][0] == "GVRNODE"
    server = DeployOrthanc(tmp_path / "orthanc")
    try:
        system = server.start().request("GET", "/system")
    finally:
        server.stop()
    assert system["DicomAet"] == "ORTHANC"


def test_docs_install_from_the_repository() -> None:
    """No doc or message suggests installing gvr-node from a registry (none serves it); both composes are shown."""
    texts = {path: path.read_text() for path in [REPO_ROOT / "README.md", *(REPO_ROOT / "docs").glob("*.md"),
                                                 *(REPO_ROOT / "node").rglob("*.py"), *DEPLOY.rglob("*.*")]}  # fmt: skip
    assert [str(path) for path, text in texts.items() if "gvr-node[" in text] == []
    deployment = texts[REPO_ROOT / "docs" / "deployment.md"]
    assert "pip install '.[monitor]'" in deployment
    assert "docker compose -f deploy/docker-compose.yml config" in deployment
    assert "docker-compose -f deploy/docker-compose.yml config" in deployment
