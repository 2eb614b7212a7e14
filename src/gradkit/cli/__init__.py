"""The ``gradkit`` command line: ``gradkit train|compare|plot|datasets|env``."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Sequence

from tqdm.auto import tqdm

from gradkit._fileio import is_disk_full
from gradkit.cli import compare, datasets, diagnose, env, evaluate, memory, plot, schedule, train
from gradkit.cli._parser import Parser
from gradkit.errors import GradkitError, print_line
from gradkit.threads import torch_threads

__all__ = ["main"]

_COMMANDS = (train, compare, plot, datasets, env, diagnose, evaluate, schedule, memory)
_TRAINS = ("train", "compare")


class _TqdmHandler(logging.Handler):
    """Log lines that do not break progress bars."""

    def emit(self, record: logging.LogRecord) -> None:
        # With its newline, in one write (as print_line): lines of worker processes never run together.
        tqdm.write(self.format(record) + "\n", file=sys.stderr, end="")


def _parser() -> Parser:
    parser = Parser(
        prog="gradkit",
        description="Train PyTorch models faster and in less memory than plain backprop: "
        "Features Replay, approximate activations, likelihood-ratio gradients.",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and results")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for command in _COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (2 for bad input, 130 for Ctrl-C)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("gradkit")
    # Restored afterwards: main() is also called in-process (tests, notebooks).
    saved = (root.handlers[:], root.level, root.propagate)
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING if args.quiet else logging.INFO)
    root.propagate = False
    try:
        # A command's --threads holds for the command only (main() also runs in-process).
        with torch_threads(None):
            return args.run(args)
    except GradkitError as exc:
        # Ctrl-C is not an error; its message already says what was saved.
        kind = "" if exc.exit_code == 130 else "error: "
        if not getattr(exc, "already_reported", False):  # worker processes print their own line
            print_line(f"gradkit {args.command}: {kind}{exc}")
        return exc.exit_code
    except KeyboardInterrupt:
        # The training loop turns Ctrl-C into RunInterrupted; one that gets here came before it ran
        # (loading data, building the model), so no checkpoint exists yet.
        what = ("interrupted before training started; nothing was written" if args.command in _TRAINS
                else "interrupted")
        print_line(f"gradkit {args.command}: {what}")
        return 130
    except OSError as exc:
        # A filesystem error no check foresaw (disk full while appending, a folder removed meanwhile).
        where = f" {exc.filename}" if exc.filename else ""
        reason = "no space left on device" if is_disk_full(exc) else (exc.strerror or str(exc))
        print_line(f"gradkit {args.command}: error: cannot access{where}: {reason}; check the path or free space")
        return 2
    finally:
        root.handlers[:], root.level, root.propagate = saved[0], saved[1], saved[2]
        if argv is None and threading.current_thread() is threading.main_thread():
            # The command is over and its one line printed: a further Ctrl-C during interpreter
            # shutdown (atexit callbacks of torch and tqdm) would only add an "Exception ignored in
            # atexit callback" trace. In-process callers (argv given) keep their handlers.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
