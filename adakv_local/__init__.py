"""adakv-local: Ada-KV adaptive per-head KV-cache eviction for llama.cpp, from Python.

Importing this package points llama-cpp-python at adakv-local's patched libllama, so
import it before ``llama_cpp``.
"""

from __future__ import annotations

from ._lib import bind_llama_cpp as _bind_llama_cpp
from .errors import (
    AdaKVError,
    CacheFullError,
    ClosedError,
    LibraryMismatchError,
    NativeAllocError,
    NativeBackendError,
    NativeInvalidArgument,
    NativeLibraryError,
)

__version__ = "0.1.0"

try:
    _bind_llama_cpp()
except NativeLibraryError:
    # the CLI's `models` commands and `--help` work without the native library; anything
    # that needs it raises this error again with the same message when it is used
    pass



def __getattr__(name: str):
    # imported on first use: importing llama_cpp takes a while and needs the native library
    if name in ("Llama", "AdaKVStats"):
        from . import llama

        return getattr(llama, name)
    if name == "ConversationCache":
        from .conversations import ConversationCache

        return ConversationCache
    if name == "AdaKVConfig":
        from .config import AdaKVConfig

        return AdaKVConfig
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AdaKVConfig",
    "AdaKVStats",
    "ConversationCache",
    "Llama",
    "AdaKVError",
    "CacheFullError",
    "ClosedError",
    "LibraryMismatchError",
    "NativeAllocError",
    "NativeBackendError",
    "NativeInvalidArgument",
    "NativeLibraryError",
    "__version__",
]
