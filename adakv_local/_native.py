"""cffi binding (ABI mode) of adakv-local's own C API, ``native/include/llama-adakv.h``.

The declarations are read from the installed headers, between their ADAKV_CDEF_BEGIN and
ADAKV_CDEF_END markers, so that the C headers stay the single source of truth: the API
(``llama-adakv.h``) and the op-level entry points of the exactness tests
(``llama-adakv-testing.h``, not part of the API that applications use). The
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

ABI_VERSION = 7

# return codes of llama-adakv.h (enum llama_adakv_status)
OK = 0
_ERRORS: dict[int, type[AdaKVError]] = {
    -1: NativeInvalidArgument,
    -2: NativeAllocError,
    -3: NativeBackendError,
}

_HEADER_NAMES = ("llama-adakv.h", "llama-adakv-testing.h")


def header_path(name: str = _HEADER_NAMES[0]) -> Path:
    """A C header: installed in ``adakv_local/include``, else the source tree's ``native/include``."""
    here = Path(__file__).resolve().parent
    for cand in (here / "include" / name, here.parent / "native" / "include" / name):
        if cand.exists():
            return cand
    raise NativeLibraryError(f"{name} not found next to the adakv_local package; reinstall it")


def cdef_source(header_text: str) -> str:
    """The declarations cffi can parse: the marked block of the header, without LLAMA_API."""
    m = re.search(r"/\* ADAKV_CDEF_BEGIN \*/(.*?)/\* ADAKV_CDEF_END \*/", header_text, re.S)
    if not m:
        raise NativeLibraryError("an adakv header has no ADAKV_CDEF_BEGIN/END block")
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
    for name in _HEADER_NAMES:
        ffi.cdef(cdef_source(header_path(name).read_text()))
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
