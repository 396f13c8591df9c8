"""The `lewm` command: subcommands only; each lives in its module and registers its own parser.

Each module named in COMMANDS provides `add_parser(subparsers)`, which adds one subcommand and sets
`func` (called with the parsed args, returns an exit code). Modules are imported lazily, only for the
subcommand being run, so `lewm --help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from .errors import USER_ERRORS

# subcommand -> (module, one-line help)
COMMANDS = {
    "train": ("lewm.train", "train a world model on HDF5 episodes"),
    "collect": ("lewm.data.collect", "collect episodes from an environment into HDF5"),
    "show": ("lewm.data.show", "write a GIF/MP4 of one episode of a data set"),
    "eval": ("lewm.evals.planning", "plan with a checkpoint under the evaluation protocol"),
    "curve": ("lewm.evals.curve", "success against training step, from a run's checkpoints"),
    "probe": ("lewm.evals.probe", "linear/MLP probes from frozen embeddings to physical state"),
    "surprise": ("lewm.evals.surprise", "violation-of-expectation surprise along trajectories"),
    "collapse": ("lewm.collapse", "train with lambda 0 and 0.09 and compare effective rank"),
    "quickstart": ("lewm.quickstart", "collect, train and evaluate TwoRoom on this machine"),
    "convert": ("lewm.convert", "reference checkpoint (weights.pt) to ours, or back"),
    "idm": ("lewm.train_idm", "train the inverse-dynamics head (planner idm, --init idm)"),
    "reach": ("lewm.train_reach", "train the reachability head (eval --cost reach | mix)"),
}


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("lewm")
    except Exception:
        return "unknown (not installed)"


class _HelpFormatter(argparse.HelpFormatter):
    """Each subcommand and its help on one line (argparse under-counts the subcommands' indent)."""

    def __init__(self, prog):
        super().__init__(prog, max_help_position=32)
        self._action_max_length = 6 + max(map(len, COMMANDS))


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MUJOCO_GL", "egl")
    os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="lewm", description="LeWorldModel engine: a JEPA world model from pixels, and planning with it.",
        epilog="`lewm COMMAND --help` shows a command's flags.",
        formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"lewm {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    cmd = argv[0] if argv and not argv[0].startswith("-") else None
    for name, (mod, help_) in COMMANDS.items():
        if name == cmd:
            importlib.import_module(mod).add_parser(sub)
        else:
            sub.add_parser(name, help=help_)
    args = parser.parse_args(argv)
    if not getattr(args, "command", None) or not hasattr(args, "func"):
        parser.print_help()
        return 0 if not argv else 2
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as e:
        print(f"lewm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"lewm {args.command}: interrupted{': ' + str(e) if str(e) else ''}", file=sys.stderr)
        return 130
    except OSError as e:  # a full disk, a permission, ...: the file and the reason, no traceback
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"lewm {args.command}: error: {e.strerror or e}{where}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    # `python -m lewm.cli` runs this file as __main__, a second copy of the module: hand over to the
    # real `lewm.cli`.
    from lewm.cli import main as _main
    sys.exit(_main())
