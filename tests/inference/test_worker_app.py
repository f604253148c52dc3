"""The worker's Celery app: a delivery-only worker never imports torch or the models."""

from __future__ import annotations

import subprocess
import sys

from inference.worker_app import task_modules_for

PROBE = """
import sys
from node.config import load_settings
from inference.worker_app import make_worker_app, task_modules_for
app = make_worker_app(load_settings(), modules=task_modules_for({queues!r}))
app.loader.import_default_modules()  # what `celery worker` does before it says ready
print(sorted(app.tasks.keys() & {{"inference.analyze_study", "node.deliver_results"}}))
print("torch" in sys.modules)
"""


def _probe(queues: list[str], tmp_path: object) -> list[str]:
    done = subprocess.run([sys.executable, "-c", PROBE.format(queues=queues)], capture_output=True, text=True,
                          timeout=120, check=True, env={"GVR_DATA_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"})  # fmt: skip
    return done.stdout.split("\n")


def test_task_modules_per_queue() -> None:
    assert task_modules_for(["dicom"]) == ("node.delivery",)
    assert task_modules_for(["gpu", "dicom"]) == ("inference.tasks", "node.delivery")


def test_delivery_worker_never_imports_torch(tmp_path: object) -> None:
    tasks, torch_loaded = _probe(["dicom"], tmp_path)[:2]
    assert tasks == "['node.deliver_results']" and torch_loaded == "False"
    tasks, torch_loaded = _probe(["gpu"], tmp_path)[:2]
    assert tasks == "['inference.analyze_study']" and torch_loaded == "True"  # the probe can tell
