"""``gvr``: dispatch to a sub-command module, imported only when it runs.

Each sub-command module has ``build_parser() -> argparse.ArgumentParser`` and
``main(argv: list[str] | None = None) -> int``. Importing lazily keeps
``gvr node`` free of torch (the training and inference commands need it).
"""

from __future__ import annotations

import difflib
import importlib
import sys

# name -> (module, one-line summary)
COMMANDS: dict[str, tuple[str, str]] = {
    "node": ("node.cli.node_cmd", "run the storage SCP and the study assembler"),
    "echo": ("node.cli.echo", "C-ECHO a DICOM peer: gvr echo AE@host:port"),
    "send": ("node.cli.send", "C-STORE files to a peer: gvr send PATH... --to AE@host:port"),
    "db": ("node.cli.db", "audit database maintenance: gvr db upgrade"),
    "audit": ("node.cli.audit", "show recent associations, studies, jobs and events"),
    "resend": ("node.cli.resend", "deliver a job's SC and SR again: gvr resend JOB [--now]"),
    "rerun": ("node.cli.rerun", "run a job's inference again: gvr rerun JOB"),
    "phantoms": ("training.cli.phantoms", "write synthetic chest radiograph phantoms"),
    "train": ("training.cli.train", "train the generator, encoder or latent classifier"),
    "evaluate": ("training.cli.evaluate", "evaluate a bundle on held-out images"),
    "export": ("training.cli.export", "write a model bundle from trained checkpoints"),
    "explain": ("inference.cli.explain", "predict and explain DICOM files offline"),
    "worker": ("inference.cli.worker", "run a Celery worker (queues gpu and/or dicom)"),
    "demo": ("node.cli.demo", "the end-to-end demo on the embedded default"),
    "status": ("node.cli.status", "queue depths, live workers, recent jobs, the oldest unfinished job"),
    "monitor": ("node.cli.monitor", "run Flower (web monitoring) against the broker"),
    "web": ("node.cli.web", "the review page: jobs, timelines, pictures, re-send/re-run (login)"),
}


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: gvr COMMAND [options]   (gvr COMMAND --help for each; gvr --version)", "", "commands:"]
    for name, (_module, summary) in COMMANDS.items():
        lines.append(f"  {name.ljust(width)}  {summary}")
    return "\n".join(lines)


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed_version

    try:
        return installed_version("gvr-node")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed: pip install -e .)"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0 if args else 2
    if args[0] in ("-V", "--version"):
        print(f"gvr {version()}")
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        print(f"gvr: unknown command {name!r}{hint}\n\n{_usage()}", file=sys.stderr)
        return 2
    from node.config_check import SettingsError

    module = importlib.import_module(COMMANDS[name][0])
    try:
        return int(module.main(rest))
    except SettingsError as error:  # issue 11: a user's mistake is a sentence and exit 2, not a traceback
        print(f"gvr {name}: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
