"""Long natural-language texts that exist on every machine: the Python standard library's documentation.

Evaluation needs many long prompts and no data set can be downloaded here, so prompts are
assembled from the docstrings of standard-library modules (English prose written by the
CPython developers, shipped with every Python). The texts depend on the Python version only.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Iterator

# modules whose documentation is mostly prose
MODULES = (
    "argparse", "collections", "functools", "itertools", "json", "logging", "pathlib", "subprocess",
    "textwrap", "unittest", "datetime", "shutil", "tarfile", "zipfile", "email.message", "http.client",
    "sqlite3", "decimal", "fractions", "statistics", "random", "heapq", "bisect", "difflib", "csv",
    "configparser", "string", "threading", "asyncio.tasks", "socket", "tempfile", "inspect", "typing",
    "dataclasses", "enum", "contextlib", "pickle", "os", "re", "codecs", "doctest", "pdb", "unittest.mock",
    "http.cookiejar", "ast", "turtle",
)  # fmt: skip


def module_text(name: str) -> str:
    mod = importlib.import_module(name)
    parts = [inspect.getdoc(mod) or ""]
    for attr in sorted(dir(mod)):
        if attr.startswith("_"):
            continue
        obj = getattr(mod, attr, None)
        if not (inspect.isfunction(obj) or inspect.isclass(obj)) or getattr(obj, "__module__", None) != mod.__name__:
            continue
        doc = inspect.getdoc(obj)
        if doc and len(doc) > 200:
            parts.append(f"{attr}: {doc}")
    return "\n\n".join(p.strip() for p in parts if p.strip())


def documents(min_chars: int = 4000) -> Iterator[tuple[str, str]]:
    """(module name, text) for every module of MODULES whose documentation has at least min_chars."""
    for name in MODULES:
        try:
            text = module_text(name)
        except Exception:  # a module missing from a slim Python build: skip it
            continue
        if len(text) >= min_chars:
            yield name, text

