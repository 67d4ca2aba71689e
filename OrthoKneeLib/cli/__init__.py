"""The ``orthoknee`` command.

Each subcommand is a thin shell over the engine, one module per group of commands (info,
images, synth, pretrain, predict, training, cache): it parses arguments, calls OrthoKneeLib,
and prints either a table for people or ``--json`` for programs. Errors of the
OrthoKneeError family are printed as one line (file, problem, advice) with exit code 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from .. import __version__
from ..errors import OrthoKneeError
from ..progress import Terminated, forget_interrupts, interrupt_on_signal
from . import cache, images, info, predict, pretrain, serve, synth, training
from .args import OneLineParser
from .common import EXIT_USAGE_OR_INPUT

__all__ = ["main", "run", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="orthoknee", description="Knee MRI: 11 structures and 8 findings.")
    parser.add_argument("--version", action="version", version=f"orthoknee {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (info, images, synth, pretrain, predict, serve, training, cache):
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    import signal
    import threading

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # recorded in bundles, so a model card can quote the exact command
    previous = {}
    forget_interrupts()
    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.signal(s, interrupt_on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return int(args.func(args) or 0)
    except OrthoKneeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE_OR_INPUT
    except KeyboardInterrupt as exc:
        what = "terminated" if isinstance(exc, Terminated) else "cancelled"
        print(
            f"orthoknee {args.command}: {what}; files being written were discarded, earlier results are as they were.",
            file=sys.stderr,
        )
        return 143 if isinstance(exc, Terminated) else 130
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        forget_interrupts()


def run() -> None:
    """The process entry (the ``orthoknee`` script, ``python -m OrthoKneeLib.cli``): exits with
    :func:`main`'s code. A Ctrl-C that lands after main's own handler (torch can leave a SIGINT
    pending and deliver it again on the way out) would otherwise end an orderly cancel as death
    by signal (exit -2, not 130); the process is ending either way, so it is ignored from here."""
    import signal
    import threading

    try:
        code = main()
    except KeyboardInterrupt as exc:  # between main's handler and here: still a cancel
        code = 143 if isinstance(exc, Terminated) else 130
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(code)


if __name__ == "__main__":
    run()
