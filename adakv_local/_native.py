"""cffi binding (ABI mode) of adakv-local's own C API, ``native/include/llama-adakv.h``.

The declarations are read from the installed header, between its ADAKV_CDEF_BEGIN and
ADAKV_CDEF_END markers, so that the C header stays the single source of truth. The
library opened is the same libllama that llama-cpp-python uses (see :mod:`._lib`).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import _lib
from .errors import (
    AdaKVError,
    NativeAllocError,
    NativeBackendError,
    NativeInvalidArgument,
    NativeLibraryError,
)

ABI_VERSION = 3

# return codes of llama-adakv.h (enum llama_adakv_status)
OK = 0
_ERRORS: dict[int, type[AdaKVError]] = {
    -1: NativeInvalidArgument,
    -2: NativeAllocError,
    -3: NativeBackendError,
}

_HEADER_NAME = "llama-adakv.h"


def header_path() -> Path:
    """The C header: installed in ``adakv_local/include``, else the source tree's ``native/include``."""
    here = Path(__file__).resolve().parent
    for cand in (here / "include" / _HEADER_NAME, here.parent / "native" / "include" / _HEADER_NAME):
        if cand.exists():
            return cand
    raise NativeLibraryError(f"{_HEADER_NAME} not found next to the adakv_local package; reinstall it")


def cdef_source(header_text: str) -> str:
    """The declarations cffi can parse: the marked block of the header, without LLAMA_API."""
    m = re.search(r"/\* ADAKV_CDEF_BEGIN \*/(.*?)/\* ADAKV_CDEF_END \*/", header_text, re.S)
    if not m:
        raise NativeLibraryError(f"{_HEADER_NAME} has no ADAKV_CDEF_BEGIN/END block")
    body = re.sub(r"//[^\n]*", "", m.group(1))
    return re.sub(r"\bLLAMA_API\b", "", body)


@dataclass(frozen=True)
class Native:
    """The opened library: ``ffi`` (the cffi.FFI) and ``lib`` (its functions)."""

    ffi: Any
    lib: Any
    path: Path

    def check(self, rc: int) -> int:
        """Return rc if it is OK, else raise the exception mapped to it with the library's message."""
        if rc == OK:
            return rc
        msg = self.ffi.string(self.lib.llama_adakv_last_error()).decode("utf-8", "replace")
        raise _ERRORS.get(rc, AdaKVError)(msg or f"adakv C API call failed with code {rc}")


@functools.cache
def native() -> Native:
    """Open libllama with cffi (once per process) and check its ABI version."""
    import cffi

    path = _lib.bind_llama_cpp()
    ffi = cffi.FFI()
    ffi.cdef(cdef_source(header_path().read_text()))
    try:
        lib = ffi.dlopen(str(path))
    except OSError as e:
        raise NativeLibraryError(f"could not load {path}: {e}") from e
    abi = lib.llama_adakv_abi_version()
    if abi != ABI_VERSION:
        raise NativeLibraryError(
            f"{path} has adakv ABI version {abi}, this Python package expects {ABI_VERSION}; reinstall adakv-local"
        )
    return Native(ffi=ffi, lib=lib, path=path)


def version_info() -> dict[str, str]:
    """Versions of the native library: adakv-local's and the pinned llama.cpp commit."""
    n = native()
    return {
        "adakv_native": n.ffi.string(n.lib.llama_adakv_version()).decode(),
        "llama_cpp_commit": n.ffi.string(n.lib.llama_adakv_llama_cpp_commit()).decode(),
        "library": str(n.path),
    }
