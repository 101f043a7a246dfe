"""A GGUF file checked before llama.cpp loads it, so that a broken file gets a reason.

llama.cpp's loader answers every broken file with "failed to load model"; the cause is in its
log, which llama-cpp-python hides unless ``verbose=True``. :func:`check_gguf` reads the header,
the metadata and the tensor directory with plain reads (no tensor data) and names the first
thing llama.cpp's ``gguf_init_from_file`` would trip on: not a file, empty, wrong magic (with a
guess at what the file is instead), an unsupported version, a file that ends inside the header,
or tensor data that runs past the end of the file (a truncated copy or download).

Layout (``ggml/src/gguf.cpp``, little-endian)::

    "GGUF" | u32 version | i64 n_tensors | i64 n_kv
    n_kv x      (string key, u32 type, value)          value: scalar | string | (u32 type, u64 n, n values)
    n_tensors x (string name, u32 n_dims, i64 ne[n_dims], u32 ggml_type, u64 offset)
    padding to general.alignment (default 32) | tensor data, each tensor at data start + offset

A string is a u64 length and that many bytes.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import gguf

GGUF_VERSIONS = (2, 3)  # what this llama.cpp reads: v1 was dropped, v3 is the newest
_DEFAULT_ALIGNMENT = 32
_MAX_DIMS = 4
# gguf_type -> size of one scalar; 8 is a string, 9 an array
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY, _UINT32 = 8, 9, 4
_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
                   12: "<d"}


class GGUFFileError(ValueError):
    """The file is not a GGUF file llama.cpp can load; ``reason`` says why, ``path`` which file."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        super().__init__(f"{os.fspath(path)}: {reason}")
        self.path = Path(path)
        self.reason = reason


@dataclass(frozen=True)
class GGUFInfo:
    """What the header says. ``n_ctx_train``: ``<architecture>.context_length``, None when absent."""

    path: Path
    version: int
    architecture: str | None
    n_ctx_train: int | None
    n_tensors: int
    file_bytes: int


def _what_else(head: bytes) -> str:
    """A guess at what a file that is not GGUF is, from its first bytes."""
    if head.startswith(b"\x7fELF"):
        return "an ELF executable or library"
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive (a wheel?)"
    if head.startswith(b"version https://git-lfs"):
        return "a Git LFS pointer, not the model itself (run `git lfs pull`)"
    if head.lstrip().lower().startswith((b"<!doctype html", b"<html")):
        return "an HTML page (a failed download?)"
    if head[:4] in (b"lmgg", b"fmgg", b"tjgg", b"algg"):  # 'ggml', 'ggmf', 'ggjt', 'ggla' as little-endian u32
        return "a pre-GGUF GGML/GGJT model, which llama.cpp no longer reads (convert it to GGUF)"
    return f"a file that starts with {head[:8]!r}"


class _Reader:
    def __init__(self, path: Path, buf: mmap.mmap | bytes) -> None:
        self.path, self.buf, self.pos, self.size = path, buf, 0, len(buf)

    def fail(self, reason: str) -> GGUFFileError:
        return GGUFFileError(self.path, reason)

    def need(self, n: int, what: str) -> int:
        if n > self.size - self.pos:
            raise self.fail(f"truncated: the file ends ({self.size} bytes) inside {what}")
        at = self.pos
        self.pos += n
        return at

    def scalar(self, fmt: str, what: str) -> int | float:
        return struct.unpack_from(fmt, self.buf, self.need(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = int(self.scalar("<Q", what))
        at = self.need(n, what)
        return bytes(self.buf[at : at + n]).decode("utf-8", errors="replace")

    def value(self, kind: int, key: str, keep: bool) -> object:
        what = f"the value of {key!r}"
        if kind == _STRING:
            return self.string(what)
        if kind not in _SCALAR_SIZES:
            raise self.fail(f"metadata key {key!r} has an invalid type {kind} (corrupt header?)")
        if keep:
            return self.scalar(_SCALAR_FORMATS[kind], what)
        self.need(_SCALAR_SIZES[kind], what)
        return None


def check_gguf(path: str | os.PathLike[str]) -> GGUFInfo:
    """Check that path is a complete GGUF file llama.cpp can read; return what its header says.

    Raises:
        GGUFFileError (a ValueError): naming the file and what is wrong with it.
    """
    p = Path(path)
    try:
        st = p.stat()
    except OSError as e:
        raise GGUFFileError(p, e.strerror or str(e)) from None
    if p.is_dir():
        raise GGUFFileError(p, "is a directory, not a GGUF file")
    if st.st_size == 0:
        raise GGUFFileError(p, "is empty (0 bytes), not a GGUF file")
    try:
        with open(p, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _check(p, buf)
    except OSError as e:
        raise GGUFFileError(p, f"cannot read: {e.strerror or e}") from None


def _check(p: Path, buf: mmap.mmap) -> GGUFInfo:
    r = _Reader(p, buf)
    head = bytes(buf[:64])
    if not head.startswith(b"GGUF"):
        raise r.fail(f"not a GGUF file (no 'GGUF' magic): {_what_else(head)}")
    r.pos = 4
    version = int(r.scalar("<I", "the header"))
    if version & 0xFFFF == 0 and version != 0:
        raise r.fail(f"GGUF version {version:#x} looks byte-swapped: a big-endian GGUF, which this build does not read")
    if version not in GGUF_VERSIONS:
        raise r.fail(f"GGUF version {version} is not supported (this llama.cpp reads versions "
                     f"{GGUF_VERSIONS[0]}-{GGUF_VERSIONS[-1]})")
    n_tensors = int(r.scalar("<q", "the header"))
    n_kv = int(r.scalar("<q", "the header"))
    if n_tensors < 0 or n_kv < 0:
        raise r.fail(f"corrupt header: it announces {n_kv} metadata entries and {n_tensors} tensors")

    meta: dict[str, object] = {}
    for i in range(n_kv):
        key = r.string(f"metadata entry {i} of {n_kv}")
        kind = int(r.scalar("<I", f"the type of {key!r}"))
        if kind == _ARRAY:
            item = int(r.scalar("<I", f"the array {key!r}"))
            n = int(r.scalar("<Q", f"the array {key!r}"))
            if item == _STRING:
                for _ in range(n):
                    r.string(f"the array {key!r}")
            elif item in _SCALAR_SIZES:
                r.need(n * _SCALAR_SIZES[item], f"the array {key!r}")
            else:
                raise r.fail(f"metadata key {key!r} is an array of invalid type {item} (corrupt header?)")
        else:
            keep = key == "general.architecture" or key.endswith(".context_length") or key == "general.alignment"
            meta[key] = r.value(kind, key, keep)
            if key == "general.alignment" and kind != _UINT32:
                raise r.fail(f"general.alignment has type {kind}, llama.cpp wants a uint32")

    sizes = gguf.GGML_QUANT_SIZES
    tensors: list[tuple[str, int, int]] = []  # name, offset, bytes
    for i in range(n_tensors):
        name = r.string(f"the directory entry of tensor {i} of {n_tensors}")
        n_dims = int(r.scalar("<I", f"the directory entry of tensor {name!r}"))
        if not 1 <= n_dims <= _MAX_DIMS:
            raise r.fail(f"tensor {name!r} has {n_dims} dimensions (llama.cpp allows 1 to {_MAX_DIMS}; a corrupt "
                         "header?)")
        ne = [int(r.scalar("<q", f"the shape of tensor {name!r}")) for _ in range(n_dims)]
        ggml_type = int(r.scalar("<I", f"the directory entry of tensor {name!r}"))
        offset = int(r.scalar("<Q", f"the directory entry of tensor {name!r}"))
        try:
            block, type_size = sizes[gguf.GGMLQuantizationType(ggml_type)]
        except (ValueError, KeyError):
            raise r.fail(f"tensor {name!r} has an unknown ggml type {ggml_type} (a newer quantization, or a "
                         "corrupt header)") from None
        if any(n < 0 for n in ne) or ne[0] % block:
            raise r.fail(f"tensor {name!r} has an invalid shape {ne} for its type (rows of {block})")
        n_bytes = ne[0] // block * type_size
        for n in ne[1:]:
            n_bytes *= n
        tensors.append((name, offset, n_bytes))

    alignment = int(meta.get("general.alignment", _DEFAULT_ALIGNMENT))  # type: ignore[call-overload]  # a uint32
    if alignment <= 0 or alignment & (alignment - 1):
        raise r.fail(f"general.alignment {alignment} is not a power of 2")
    data_start = -(-r.pos // alignment) * alignment
    for name, offset, n_bytes in tensors:
        end = data_start + offset + n_bytes
        if end > r.size:
            raise r.fail(f"truncated: tensor {name!r} needs bytes up to {end} but the file has only {r.size} "
                         "(an incomplete download or copy?)")

    arch = meta.get("general.architecture")
    n_ctx = meta.get(f"{arch}.context_length") if isinstance(arch, str) else None
    return GGUFInfo(path=p, version=version, architecture=arch if isinstance(arch, str) else None,
                    n_ctx_train=int(n_ctx) if isinstance(n_ctx, int) and n_ctx > 0 else None,
                    n_tensors=n_tensors, file_bytes=r.size)
