"""Point llama-cpp-python at adakv-local's libllama when ``llama_cpp`` is imported on its own.

Installed by adakv-local next to its package and run at every interpreter start through
``adakv-local.pth``. llama-cpp-python is installed as bindings only (scripts/install.sh builds it
with ``-DLLAMA_BUILD=OFF``) and reads ``LLAMA_CPP_LIB_PATH`` once, when ``llama_cpp`` is first
imported; without this file, code that imports ``llama_cpp`` before ``adakv_local`` (LangChain,
LlamaIndex, ``python -m llama_cpp.server``) fails with "Shared library with base name 'llama'
not found". Our library with eviction off behaves as llama.cpp's own.

What it does, nothing else: when ``LLAMA_CPP_LIB_PATH`` is unset and the library folder exists,
set ``LLAMA_CPP_LIB_PATH`` to it, the folder being ``$ADAKV_LIB_DIR`` when set (development
builds), else ``adakv_local/lib`` beside this file: the folder ``adakv_local._lib.lib_dir()``
gives for this installation, so that ``adakv_local._lib.bind_llama_cpp`` finds the same
library already loaded. An explicit ``LLAMA_CPP_LIB_PATH`` always wins (and
``bind_llama_cpp`` still refuses a different library). Nothing is imported; the cost is one
``stat``. Like ``bind_llama_cpp``, it leaves the variable set for child processes.

Why a .pth file rather than copies of the libraries in ``llama_cpp/lib`` (where llama_cpp looks
by default): wheels cannot hold symlinks, so that would be a second copy of every library, and
with ``adakv_local`` loading one copy through cffi and ``llama_cpp`` the other, a process would
hold two libllamas with separate state; the files would also belong to two distributions at
once (reinstalling llama-cpp-python deletes or overwrites them, and a llama-cpp-python built
with its own library would be overwritten silently).
"""

import os


def _point_llama_cpp_at_adakv_local() -> None:
    if os.environ.get("LLAMA_CPP_LIB_PATH"):
        return
    folder = os.environ.get("ADAKV_LIB_DIR") or os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                             "adakv_local", "lib")
    names = ("llama.dll",) if os.name == "nt" else ("libllama.so", "libllama.dylib")
    if any(os.path.isfile(os.path.join(folder, name)) for name in names):
        os.environ["LLAMA_CPP_LIB_PATH"] = folder


_point_llama_cpp_at_adakv_local()
