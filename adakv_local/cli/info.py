"""``adakv-local info``: versions, the patched libllama in use and the backends compiled in."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .. import __version__
from .errors import EXIT_OK, CLIError


def _cmd_info(args: argparse.Namespace) -> int:
    from .._native import native, version_info
    from ..errors import NativeLibraryError

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


def _backends(libllama: Path) -> list[str]:
    """Backends compiled in, from the ggml libraries next to libllama."""
    names = {"ggml-cpu": "CPU", "ggml-cuda": "CUDA", "ggml-metal": "Metal", "ggml-blas": "BLAS"}
    found = []
    for f in sorted(libllama.parent.iterdir()):
        for lib, label in names.items():
            if f.name.startswith((f"lib{lib}.", f"{lib}.")) and label not in found:
                found.append(label)
    return found


def add_parser(sub: Any) -> argparse.ArgumentParser:
    info = sub.add_parser("info", help="versions, library path and compiled-in backends",
                          description="Print the adakv-local version, the patched libllama in use, "
                          "the llama.cpp commit it was built from and the backends compiled in.")
    info.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    info.set_defaults(func=_cmd_info)
    return info
