"""What every training loop shares: a metrics log, loss plots, checkpoints and a progress bar.

Checkpoints are a folder: one safetensors file per network, ``state.json`` for
everything that is not a tensor (step, configuration, arguments), and
``optimizer.pt`` holding optimiser state as tensors and numbers only, read back
with ``torch.load(weights_only=True)``: nothing is ever unpickled. Files are
written under a temporary name and renamed, so an interrupted save never
leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

logger = logging.getLogger(__name__)

STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.pt"
METRICS_FILE = "metrics.jsonl"


class CheckpointError(ValueError):
    """A checkpoint folder is missing a file or does not match the model it should fill."""


def _replace(tmp: Path, final: Path) -> None:
    os.replace(tmp, final)


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    _replace(tmp, path)


def save_weights(module: nn.Module, path: Path) -> None:
    """safetensors of the module's state dict (contiguous CPU tensors)."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp))
    _replace(tmp, path)


def load_weights(module: nn.Module, path: Path, device: str | torch.device = "cpu") -> None:
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist")
    tensors = load_file(str(path), device=str(device))
    try:
        module.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path} does not fit the model: {exc}") from exc


def save_checkpoint(
    out: Path,
    modules: dict[str, nn.Module],
    state: dict[str, Any],
    optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
) -> None:
    """Write ``<name>.safetensors`` per module, ``optimizer.pt`` and, last, ``state.json``."""
    out.mkdir(parents=True, exist_ok=True)
    for name, module in modules.items():
        save_weights(module, out / f"{name}.safetensors")
    if optimizers:
        tmp = out / (OPTIMIZER_FILE + ".tmp")
        torch.save({name: opt.state_dict() for name, opt in optimizers.items()}, tmp)
        _replace(tmp, out / OPTIMIZER_FILE)
    write_json(out / STATE_FILE, state)


def read_state(out: Path) -> dict[str, Any]:
    path = out / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{out} holds no checkpoint ({STATE_FILE} is missing); train it first")
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def load_optimizers(out: Path, optimizers: Mapping[str, torch.optim.Optimizer]) -> None:
    path = out / OPTIMIZER_FILE
    if not path.is_file():
        raise CheckpointError(f"cannot resume: {path} is missing")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    for name, opt in optimizers.items():
        opt.load_state_dict(saved[name])


class MetricsLog:
    """Append-only JSON lines: one object per logged step, kept across ``--resume``."""

    def __init__(self, path: Path, resume: bool) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if not resume and path.exists():
            path.unlink()

    def truncate_after(self, step: int) -> None:
        """Drop lines logged after the checkpoint a resumed run continues from."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def plot_losses(records: list[dict[str, Any]], keys: Iterable[str], out: Path, title: str) -> None:
    """A PNG with one line per metric key against ``step`` (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for key in keys:
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, label=key, linewidth=1)
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_lines():
        ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def progress_bar(total: int, initial: int, desc: str) -> Iterator[int]:
    """Steps ``initial .. total-1`` with a tqdm bar on stderr (silent when not a terminal and piped)."""
    from tqdm import tqdm

    return iter(tqdm(range(initial, total), total=total, initial=initial, desc=desc,
                     file=sys.stderr, dynamic_ncols=True, mininterval=2.0))


def step_generator(seed: int, step: int) -> torch.Generator:
    """A random stream derived from (seed, step) only, so a resumed run draws what the original would."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63))


def resolve_device(name: str) -> torch.device:
    if name not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
    return torch.device(name)
