"""Where adakv-local's patched libllama lives, and pointing llama-cpp-python at it.

llama-cpp-python reads ``LLAMA_CPP_LIB_PATH`` once, when ``llama_cpp`` is first imported.
:func:`bind_llama_cpp` sets it to our library folder before that happens and refuses
(:class:`~adakv_local.errors.LibraryMismatchError`) when ``llama_cpp`` was already
imported with another library: two libllamas in one process would disagree on every
struct we share.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .errors import LibraryMismatchError, NativeLibraryError

_ENV_LIB_DIR = "ADAKV_LIB_DIR"


def lib_dir() -> Path:
    """The folder holding libllama and libggml*: ``$ADAKV_LIB_DIR`` or ``adakv_local/lib``."""
    override = os.environ.get(_ENV_LIB_DIR)
    return Path(override) if override else Path(__file__).resolve().parent / "lib"


def libllama_path() -> Path:
    """Path of the patched libllama; raises NativeLibraryError if it is not there."""
    names = {"win32": "llama.dll", "darwin": "libllama.dylib"}
    path = lib_dir() / names.get(sys.platform, "libllama.so")
    if not path.exists():
        raise NativeLibraryError(
            f"adakv-local's libllama was not found at {path}. Install the package with "
            f"`pip install .` from a checkout (it builds llama.cpp), or set {_ENV_LIB_DIR} "
            "to a folder that holds a build of it."
        )
    return path


def _loaded_llama_cpp_lib() -> Path | None:
    mod = sys.modules.get("llama_cpp.llama_cpp")
    lib = getattr(mod, "_lib", None) if mod is not None else None
    name = getattr(lib, "_name", None)
    return Path(name).resolve() if name else None


def bind_llama_cpp() -> Path:
    """Make ``import llama_cpp`` load our libllama; return its path.

    Safe to call many times. Raises LibraryMismatchError when llama_cpp is already
    imported with another library.
    """
    ours = libllama_path().resolve()
    loaded = _loaded_llama_cpp_lib()
    if loaded is not None:
        if loaded != ours:
            raise LibraryMismatchError(
                f"llama_cpp was imported before adakv_local and loaded {loaded}; adakv-local needs its "
                f"patched library {ours}. Import adakv_local before llama_cpp (or set "
                f"LLAMA_CPP_LIB_PATH={ours.parent} before starting Python)."
            )
        return ours
    if "llama_cpp" in sys.modules and "llama_cpp.llama_cpp" not in sys.modules:  # pragma: no cover
        raise LibraryMismatchError("llama_cpp is half imported; import adakv_local first")
    os.environ["LLAMA_CPP_LIB_PATH"] = str(ours.parent)
    return ours
