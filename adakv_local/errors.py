"""Exceptions of adakv-local: one per failure a caller may want to handle."""

from __future__ import annotations


class AdaKVError(RuntimeError):
    """Base class of the errors raised by adakv-local's native layer."""


class LibraryMismatchError(AdaKVError):
    """``llama_cpp`` was loaded with another libllama than adakv-local's patched one."""


class NativeLibraryError(AdaKVError):
    """The patched libllama is missing, does not load, or has another ABI version."""


class NativeInvalidArgument(AdaKVError, ValueError):
    """The C API rejected an argument (LLAMA_ADAKV_ERR_INVALID); nothing was changed."""


class NativeAllocError(AdaKVError, MemoryError):
    """The C API ran out of memory (LLAMA_ADAKV_ERR_ALLOC); nothing was changed."""


class NativeBackendError(AdaKVError):
    """A ggml backend failed to compute (LLAMA_ADAKV_ERR_BACKEND)."""


class CacheFullError(AdaKVError):
    """The tokens to evaluate do not fit in the KV cache's free cells (n_ctx), and compressing cannot
    make room (a budget as large as the cache), or a generated token would be past the model's
    trained context; nothing was evaluated. ``Llama.generate`` ends the generation there (finish
    reason "length")."""


class ClosedError(AdaKVError):
    """The Llama (or the KV-cache handle taken from it) was closed: its llama_context is freed."""
