"""The ``adakv-local`` command line: the dispatcher.

One module per command (``models``, ``info``, ``summarize``, ``chat``, ``eval``, ``serve``), each
with ``add_parser(sub)`` and the functions it runs (``bench``: :mod:`.eval`'s ``add_bench_parser``,
registered here); what several commands share is in :mod:`.common` (the eviction flags, built from
``config.OPTIONS``), exit codes and :class:`CLIError` in :mod:`.errors`. No command module imports
this one.

Exit codes (:mod:`.errors`): 0 success; 1 runtime failure, including input that cannot be used (a
missing, empty or binary document, a model file that is not a complete GGUF file); 2 usage error (a
bad option value, an unknown model name, an --n-ctx above the model's trained context; the message
names the option). Every error is one line on stderr, ``adakv-local[ COMMAND]: error: ...``, no
traceback. Data goes to stdout, progress and messages to stderr. docs/BAD-INPUT.md lists the messages.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from .. import __version__
from . import chat, info, models, serve, summarize
from . import eval as eval_cmd
from .errors import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, CLIError

__all__ = ["EXIT_FAILURE", "EXIT_OK", "EXIT_USAGE", "CLIError", "build_parser", "main"]


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (usage is what --help is for); subparsers inherit it."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="adakv-local",
        description="Ada-KV adaptive per-head KV-cache eviction for local GGUF models on llama.cpp.",
        epilog="Run `adakv-local COMMAND --help` for the options of a command.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for command in (models, info, summarize, chat, eval_cmd):
        command.add_parser(sub)
    eval_cmd.add_bench_parser(sub)
    serve.add_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CLIError as e:
        print(f"adakv-local: error: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("adakv-local: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader of stdout went away (`| head`): stop quietly
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except OSError:
            pass
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
