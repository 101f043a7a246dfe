"""check_gguf on tiny malformed files: each gets a GGUFFileError naming the file and the reason."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from adakv_local.gguf_check import GGUFFileError, check_gguf


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    from adakv_local.testing import write_llama_gguf

    return write_llama_gguf(tmp_path_factory.mktemp("gguf") / "good.gguf", n_ctx_train=2048, seed=3)


def test_a_good_file_reports_its_header(good):
    info = check_gguf(good)
    assert info.version == 3 and info.architecture == "llama" and info.n_ctx_train == 2048
    assert info.n_tensors > 0 and info.file_bytes == good.stat().st_size


# bytes kept: inside the fixed header, inside the metadata (the vocabulary array), in the tensor data,
# one byte short of the end
@pytest.mark.parametrize("keep", [10, 23, 3000, "half", "all but one"])
def test_truncated_copies_say_truncated(good, tmp_path, keep):
    data = good.read_bytes()
    n = {"half": len(data) // 2, "all but one": len(data) - 1}.get(keep, keep)
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[:n])
    with pytest.raises(GGUFFileError) as e:
        check_gguf(bad)
    assert str(bad) in str(e.value) and e.value.reason.startswith("truncated"), (n, str(e.value))


def _header(version: int) -> bytes:
    return b"GGUF" + struct.pack("<Iqq", version, 0, 0)


@pytest.mark.parametrize("content, reason", [
    (b"XXXX1234567890", "not a GGUF file (no 'GGUF' magic): a file that starts with b'XXXX1234'"),
    (b"\x7fELF\x02\x01\x01\x00" + bytes(64), "an ELF executable"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:0\n", "a Git LFS pointer"),
    (b"<!DOCTYPE html><html><body>404</body></html>", "an HTML page"),
    (b"tjgg" + bytes(60), "pre-GGUF GGML/GGJT"),
    (_header(1), "GGUF version 1 is not supported"),
    (_header(4), "GGUF version 4 is not supported"),
    (b"GGUF" + struct.pack(">I", 3) + bytes(16), "byte-swapped"),
    (b"", "is empty"),
])
def test_files_that_are_not_gguf_say_what_they_are(tmp_path, content, reason):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(content)
    with pytest.raises(GGUFFileError) as e:
        check_gguf(bad)
    assert reason in e.value.reason and str(bad) in str(e.value), str(e.value)


def test_an_empty_but_complete_gguf_passes(tmp_path):
    ok = tmp_path / "empty-model.gguf"
    ok.write_bytes(_header(3))
    info = check_gguf(ok)
    assert info.n_tensors == 0 and info.architecture is None and info.n_ctx_train is None


def test_not_a_file(tmp_path):
    with pytest.raises(GGUFFileError, match="is a directory"):
        check_gguf(tmp_path)
    with pytest.raises(GGUFFileError, match="No such file"):
        check_gguf(tmp_path / "missing.gguf")


def test_a_tensor_of_unknown_type_is_named(good, tmp_path):
    data = bytearray(good.read_bytes())
    name = b"output.weight"
    at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)  # then n_dims, ne[], type
    n_dims = struct.unpack_from("<I", data, at)[0]
    struct.pack_into("<I", data, at + 4 + 8 * n_dims, 999)
    bad = tmp_path / "type.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(GGUFFileError, match="tensor 'output.weight' has an unknown ggml type 999"):
        check_gguf(bad)
