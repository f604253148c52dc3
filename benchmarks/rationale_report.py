"""Tables, the figure grid and the docs block of the rationale benchmark, all from its JSON.

Why from the JSON: the lead reruns the benchmark with the final bundle and the
docs must show exactly what that run measured; ``python -m benchmarks.rationale
report`` rewrites the marked block of ``docs/rationale.md`` from the JSON files,
so no number is copied by hand.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from training.phantoms import SIGNS

BEGIN, END = "<!-- bench-rationale:begin (generated: python -m benchmarks.rationale report) -->", \
    "<!-- bench-rationale:end -->"
CONFIG_BEGIN, CONFIG_END = ("<!-- bench-rationale-configs:begin (generated: python -m benchmarks.rationale sweep "
                            "--configs ...) -->"), "<!-- bench-rationale-configs:end -->"
SHORT = {"cardiomegaly": "cardiomegaly", "effusion": "effusion", "venous_diversion": "venous div.",
         "edema": "edema / Kerley"}


def cell(metric: dict[str, float] | None, digits: int = 2, percent: bool = False) -> str:
    """``0.62 [0.55, 0.70]`` (estimate and bootstrap 95% CI); empty when the method has no such metric."""
    if metric is None or not np.isfinite(metric["value"]):
        return ""
    if percent:
        return f"{metric['value']:.0%} [{metric['low']:.0%}, {metric['high']:.0%}]"
    return f"{metric['value']:.{digits}f} [{metric['low']:.{digits}f}, {metric['high']:.{digits}f}]"


def main_table(rows: list[dict[str, Any]]) -> str:
    """Fidelity, closer to twin, specificity, own-mask advantage, validity, proximity, time."""
    lines = [("| method | n | fidelity: corr with x - twin (median) | in lungs + heart | closer to twin (mean) | "
              "specificity (median, lower is better) | own-mask advantage (mean) | validity | proximity | "
              "s / image |"), "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        m = r["metrics"]
        lines.append(f"| {r['method']} | {r['n']} | {cell(m['fidelity'])} | {cell(m['fidelity_organs'])} | "
                     f"{cell(m.get('closer_to_twin'))} | {cell(m['specificity'])} | "
                     f"{cell(m['own_mask_advantage'], 3)} | {cell(m.get('validity'), percent=True)} | "
                     f"{cell(m.get('proximity'), 4)} | {r['seconds_per_image']:.3f} |")
    return "\n".join(lines)


def sign_table(rows: list[dict[str, Any]]) -> str:
    """Pointing / energy share per sign, and the effusion side (right-, left-sided, all one-sided)."""
    header = " | ".join(f"{SHORT[s]} pointing | {SHORT[s]} energy" for s in SIGNS)
    lines = [f"| method | {header} | effusion side: right-sided | left-sided | all one-sided |",
             "| --- |" + " ---: |" * (2 * len(SIGNS) + 3)]
    for r in rows:
        m = r["metrics"]
        signs = " | ".join(f"{cell(m[f'pointing_{s}'])} | {cell(m[f'energy_{s}'])}" for s in SIGNS)
        lines.append(f"| {r['method']} | {signs} | {cell(m['effusion_side_right'])} | "
                     f"{cell(m['effusion_side_left'])} | {cell(m['effusion_side'])} |")
    counts = rows[0]["metrics"] if rows else {}
    if counts:
        shown = ", ".join(f"{SHORT[s]} {counts[f'pointing_{s}']['n']}" for s in SIGNS)
        lines.append(f"\nImages per sign: {shown}; one-sided effusions: right {counts['effusion_side_right']['n']}, "
                     f"left {counts['effusion_side_left']['n']}.")
    return "\n".join(lines)


def sweep_table(report: dict[str, Any]) -> str:
    lines = [("| lambda | n | validity | proximity | fidelity (median) | closer to twin (mean) | specificity | "
              "mean steps | s / image |"), "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in report["rows"]:
        m = r["metrics"]
        mark = " (chosen)" if r["lambda"] == report.get("chosen_lambda") else ""
        lines.append(f"| {r['lambda']:g}{mark} | {r['n']} | {cell(m['validity'], percent=True)} | "
                     f"{cell(m['proximity'], 4)} | {cell(m['fidelity'])} | {cell(m['closer_to_twin'])} | "
                     f"{cell(m['specificity'])} | {r['mean_steps']:.1f} | {r['seconds_per_image']:.3f} |")
    return "\n".join(lines)


def config_sweep_table(report: dict[str, Any]) -> str:
    """One row per configuration (changes from the defaults), then the oracle latent; a check where every
    target a configuration can move is met."""
    lines = [("| configuration (changes from the defaults) | closer to twin (mean) | fidelity (median) | "
              "specificity | own-mask advantage | effusion pointing | validity | proximity | mean steps | "
              "s / image | all targets |"), "| --- |" + " ---: |" * 9 + " :---: |"]
    rows = list(report["rows"]) + ([report["oracle"]] if report.get("oracle") else [])
    for r in rows:
        m = r["metrics"]
        mark = " (best by the rule)" if r["label"] == report.get("chosen") else ""
        meets = r.get("meets")
        verdict = "" if meets is None else ("yes" if all(meets.values()) else
                                            "no: " + ", ".join(k.replace("_", " ") for k, ok in meets.items()
                                                               if not ok))
        steps = "" if not np.isfinite(r["mean_steps"]) else f"{r['mean_steps']:.1f}"
        seconds = "" if not np.isfinite(r["seconds_per_image"]) else f"{r['seconds_per_image']:.2f}"
        lines.append(f"| {r['label']}{mark} | {cell(m['closer_to_twin'])} | {cell(m['fidelity'])} | "
                     f"{cell(m['specificity'])} | {cell(m['own_mask_advantage'], 3)} | "
                     f"{cell(m['pointing_effusion'])} | {cell(m['validity'], percent=True)} | "
                     f"{cell(m['proximity'], 4)} | {steps} | {seconds} | {verdict} |")
    return "\n".join(lines)


def config_sweep_markdown(report: dict[str, Any]) -> str:
    meeting = ", ".join(report["meeting_every_target"]) or "none"
    return (f"{report['bundle']}, validation seeds {report['seeds']} ({report['positives_with_sign']} positives "
            f"with a sign), {report['threads']} torch thread(s), batch 16. Rule: {report['rule']}; best: "
            f"**{report['chosen']}**. Meeting every target a configuration can move: {meeting}.\n\n"
            f"{config_sweep_table(report)}")


def quality_markdown(report: dict[str, Any]) -> str:
    head = (f"{report['bundle']} ({report['resolution']} px), seeds {report['seeds']}: {report['held_out']} "
            f"held-out phantoms, {report['with_sign']} with a sign, {report['positives_with_sign']} of those called "
            f"positive (the images below); {report['threads']} torch thread(s). Each cell: estimate [bootstrap "
            f"95% CI, 1000 resamples of the images].")
    return f"{head}\n\n{main_table(report['rows'])}\n\nPer sign:\n\n{sign_table(report['rows'])}"


def sweep_markdown(report: dict[str, Any]) -> str:
    return (f"{report['bundle']}, validation seeds {report['seeds']} ({report['positives_with_sign']} positives "
            f"with a sign). Rule: {report['rule']}; chosen lambda: **{report['chosen_lambda']}**.\n\n"
            f"{sweep_table(report)}")


def docs_block(quality: dict[str, Any] | None, sweep: dict[str, Any] | None, speed: str | None) -> str:
    parts = [BEGIN]
    parts.append("#### Quality\n\n" + (quality_markdown(quality) if quality else "_not run yet (placeholder)_"))
    if quality:
        parts.append("![GVR, the baselines and the templates on held-out positives](rationale_quality.png)")
    parts.append("#### Lambda sweep (validation phantoms)\n\n" + (sweep_markdown(sweep) if sweep
                                                                  else "_not run yet (placeholder)_"))
    parts.append("#### Speed\n\n" + (speed or "_not run yet (placeholder)_"))
    parts.append(END)
    return "\n\n".join(parts)


def write_docs(doc: Path, block: str, begin: str = BEGIN, end: str = END) -> None:
    """Replace the block of ``doc`` between ``begin`` and ``end`` (append it when the markers are missing)."""
    text = doc.read_text() if doc.exists() else ""
    if begin in text and end in text:
        before, rest = text.split(begin, 1)
        after = rest.split(end, 1)[1]
        text = before + block + after
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    doc.write_text(text)


def report_from(out: Path, doc: Path) -> None:
    """Rebuild the docs block from ``out``'s JSON files (those present)."""
    def load(name: str) -> Any:
        path = out / name
        return json.loads(path.read_text()) if path.exists() else None

    speed = load("rationale_speed.json")
    speed_md = None
    if speed:
        from benchmarks.rationale_speed import speed_table

        speed_md = f"{speed[0]['resolution']} px, {speed[0]['threads']} thread(s).\n\n{speed_table(speed)}"
    write_docs(doc, docs_block(load("rationale_quality.json"), load("rationale_sweep.json"), speed_md))
    config_block_from(out, doc)


def config_block_from(out: Path, doc: Path) -> None:
    """Rewrite the configuration sweep's own block from ``out``'s JSON, if there is one; nothing else.

    Its own block: the configuration sweep is not part of every benchmark run.
    """
    path = out / "rationale_config_sweep.json"
    if path.exists():
        block = config_sweep_markdown(json.loads(path.read_text()))
        write_docs(doc, f"{CONFIG_BEGIN}\n\n{block}\n\n{CONFIG_END}", CONFIG_BEGIN, CONFIG_END)


def figure(data_x: np.ndarray, difference: np.ndarray, maps: dict[str, np.ndarray], path: Path) -> None:
    """Rows of phantoms; columns: x, x - twin, then each method's map (signed maps on a symmetric scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = ["x", "x - twin", *maps]
    rows = len(data_x)
    fig, axes = plt.subplots(rows, len(columns), figsize=(1.25 * len(columns), 1.3 * rows), squeeze=False)
    for row in range(rows):
        panels = [data_x[row], difference[row], *[maps[name][row] for name in maps]]
        for col, image in enumerate(panels):
            ax = axes[row][col]
            if col == 0:
                ax.imshow(image, cmap="gray", vmin=-1, vmax=1)
            else:
                limit = float(np.abs(image).max()) or 1.0
                ax.imshow(image, cmap="bwr", vmin=-limit, vmax=limit)
            ax.set_xticks([]), ax.set_yticks([])
            if row == 0:
                title = columns[col].replace(" (other images)", "\n(others)").replace("Integrated", "Int.")
                ax.set_title(title.replace(", overfitted classifier (control)", "\noverfit control"), fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
