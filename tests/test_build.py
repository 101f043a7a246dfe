"""The build and the binding: patched libllama inside the package, loaded by llama-cpp-python."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PREPARE = ROOT / "cmake" / "prepare_llama_cpp.py"


def run_py(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "LLAMA_CPP_LIB_PATH"}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, cwd="/")


def test_llama_cpp_loads_the_library_inside_adakv_local():
    import adakv_local

    pkg_lib = Path(adakv_local.__file__).resolve().parent / "lib"
    proc = run_py(
        "import adakv_local, llama_cpp, ctypes\n"
        "lib = llama_cpp.llama_cpp._lib\n"
        "print(lib._name)\n"
        "print(hasattr(lib, 'llama_adakv_version'))\n"
    )
    assert proc.returncode == 0, proc.stderr
    name, has_symbol = proc.stdout.split()
    assert Path(name).resolve().parent == pkg_lib.resolve()
    assert has_symbol == "True"


def test_native_version_and_commit():
    import re

    from adakv_local import __version__
    from adakv_local._native import ABI_VERSION, header_path, native, version_info

    info = version_info()
    assert info["adakv_native"] == __version__
    assert info["llama_cpp_commit"] == "0c1e57098bba43ac29e6e3b677cdceebdd22334f"
    # the library, its header and the Python binding agree on the ABI (4: kept positions in the state)
    header = int(re.search(r"#define LLAMA_ADAKV_ABI_VERSION (\d+)", header_path().read_text()).group(1))
    assert native().lib.llama_adakv_abi_version() == header == ABI_VERSION == 4


def test_importing_llama_cpp_first_with_another_library_is_refused(tmp_path):
    import adakv_local

    # a copy of the same library in another folder stands for "another libllama"
    other = tmp_path / "otherlib"
    shutil.copytree(Path(adakv_local.__file__).resolve().parent / "lib", other)
    proc = run_py("import llama_cpp\nimport adakv_local\n", env={"LLAMA_CPP_LIB_PATH": str(other)})
    assert proc.returncode != 0
    assert "LibraryMismatchError" in proc.stderr
    assert "Import adakv_local before llama_cpp" in proc.stderr


def test_importing_llama_cpp_after_adakv_local_is_fine():
    proc = run_py("import adakv_local, llama_cpp\nimport adakv_local._lib as l\nprint(l.bind_llama_cpp())\n")
    assert proc.returncode == 0, proc.stderr


def _fake_tree(root: Path) -> Path:
    (root / "src").mkdir(parents=True)
    (root / "CMakeLists.txt").write_text("project(fake)\n")
    (root / "src" / "llama.cpp").write_text("int a = 1;\nint b = 2;\nint c = 3;\n")
    return root


def _patch(old: str, new: str) -> str:
    return (
        "header: what and why\n\n"
        "diff --git a/src/llama.cpp b/src/llama.cpp\n"
        "--- a/src/llama.cpp\n+++ b/src/llama.cpp\n"
        "@@ -1,3 +1,3 @@\n int a = 1;\n"
        f"-{old}\n+{new}\n int c = 3;\n"
    )


def test_patches_apply_in_order_and_only_changed_files_are_rewritten(tmp_path):
    src = _fake_tree(tmp_path / "pristine")
    patches = tmp_path / "patches"
    patches.mkdir()
    (patches / "0001-b.patch").write_text(_patch("int b = 2;", "int b = 20;"))
    (patches / "0002-b.patch").write_text(_patch("int b = 20;", "int b = 200;"))
    dest = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(PREPARE), "--patches", str(patches), "--dest", str(dest),
                           "--source", str(src)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "int b = 200;" in (dest / "src" / "llama.cpp").read_text()
    assert "int b = 2;" in (src / "src" / "llama.cpp").read_text()  # pristine untouched
    mtime = (dest / "CMakeLists.txt").stat().st_mtime_ns
    (patches / "0002-b.patch").unlink()
    proc = subprocess.run([sys.executable, str(PREPARE), "--patches", str(patches), "--dest", str(dest),
                           "--source", str(src)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "int b = 20;" in (dest / "src" / "llama.cpp").read_text()
    assert (dest / "CMakeLists.txt").stat().st_mtime_ns == mtime


def test_a_patch_that_does_not_apply_names_itself(tmp_path):
    src = _fake_tree(tmp_path / "pristine")
    patches = tmp_path / "patches"
    patches.mkdir()
    (patches / "0001-good.patch").write_text(_patch("int b = 2;", "int b = 20;"))
    (patches / "0002-broken.patch").write_text(_patch("int b = 999;", "int b = 0;"))
    proc = subprocess.run([sys.executable, str(PREPARE), "--patches", str(patches), "--dest",
                           str(tmp_path / "out"), "--source", str(src)], capture_output=True, text=True)
    assert proc.returncode == 3
    assert "patch 0002-broken.patch does not apply" in proc.stderr
    assert not (tmp_path / "out" / ".adakv-stamp").exists()


def _pristine_source() -> Path:
    """The cached pristine llama.cpp (populated by the install)."""
    sys.path.insert(0, str(PREPARE.parent))
    try:
        import prepare_llama_cpp
    finally:
        sys.path.pop(0)
    if os.environ.get("LLAMA_CPP_SOURCE_DIR"):
        return Path(os.environ["LLAMA_CPP_SOURCE_DIR"])
    return prepare_llama_cpp.unpack_pristine(prepare_llama_cpp.cache_root())


def test_the_real_patch_series_applies_to_the_pinned_llama_cpp(tmp_path):
    proc = subprocess.run([sys.executable, str(PREPARE), "--patches", str(ROOT / "patches"), "--dest",
                           str(tmp_path / "src"), "--source", str(_pristine_source())],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "ggml_flash_attn_ext_set_head_start" in (tmp_path / "src/ggml/include/ggml.h").read_text()
    for patch in sorted((ROOT / "patches").glob("*.patch")):
        head = patch.read_text().split("diff --git", 1)[0]
        assert len(head.strip().splitlines()) >= 3, f"{patch.name} needs a header saying what and why"


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")
def test_cmake_configure_fails_loudly_on_a_broken_patch(tmp_path):
    patches = tmp_path / "patches"
    patches.mkdir()
    shutil.copy(ROOT / "patches" / "0001-ggml-flash-attn-head-start.patch", patches)
    (patches / "0002-broken.patch").write_text(
        "diff --git a/src/llama.cpp b/src/llama.cpp\n--- a/src/llama.cpp\n+++ b/src/llama.cpp\n"
        "@@ -1,1 +1,1 @@\n-this line is not in llama.cpp\n+neither is this\n"
    )
    proc = subprocess.run(["cmake", "-S", str(ROOT), "-B", str(tmp_path / "build"),
                           f"-DADAKV_PATCHES_DIR={patches}", f"-DLLAMA_CPP_SOURCE_DIR={_pristine_source()}"],
                          capture_output=True, text=True)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "patch 0002-broken.patch does not apply" in out
    assert "preparing the llama.cpp source failed" in out
