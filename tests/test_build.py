"""The build and the binding: patched libllama inside the package, loaded by llama-cpp-python."""

from __future__ import annotations

import importlib.util
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
    # the library, its header and the Python binding agree on the ABI (6: the pooled block, llama_adakv_get_block)
    header = int(re.search(r"#define LLAMA_ADAKV_ABI_VERSION (\d+)", header_path().read_text()).group(1))
    assert native().lib.llama_adakv_abi_version() == header == ABI_VERSION == 7


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


# -- llama_cpp on its own ----------------------------------------------------------------------------

HOOK = ROOT / "cmake" / "site" / "_adakv_local_llama_cpp.py"
ALONE = (
    "import sys, llama_cpp\n"
    "print(llama_cpp.llama_cpp.llama_print_system_info().decode())\n"
    "lib = llama_cpp.llama_cpp._lib\n"
    "print(lib._name)\n"
    "print('adakv_local' in sys.modules, hasattr(lib, 'llama_adakv_version'))\n"
)


def _without(*names: str) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in names}


def _run_alone(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd="/", timeout=120)


def _check_alone(proc: subprocess.CompletedProcess, lib_dir: Path) -> None:
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert "CPU :" in lines[0], lines  # llama_print_system_info
    assert Path(lines[-2]).resolve().parent == lib_dir.resolve(), lines
    assert lines[-1] == "False True", lines  # adakv_local never imported; our library loaded


def test_the_startup_hook_points_llama_cpp_at_adakv_lib_dir(tmp_path):
    """The .pth hook, run by hand (a source tree has no .pth installed): llama_cpp alone loads ADAKV_LIB_DIR."""
    from adakv_local._lib import lib_dir

    ours = lib_dir()
    run_hook = f"import runpy; runpy.run_path({str(HOOK)!r})\n"
    env = {**_without("LLAMA_CPP_LIB_PATH", "PYTHONPATH"), "ADAKV_LIB_DIR": str(ours)}
    _check_alone(_run_alone(run_hook + ALONE, env), ours)
    # an explicit LLAMA_CPP_LIB_PATH wins; a folder without libllama is not used
    show = run_hook + "import os; print(os.environ.get('LLAMA_CPP_LIB_PATH'))"
    assert _run_alone(show, {**env, "LLAMA_CPP_LIB_PATH": "/somewhere/else"}).stdout.strip() == "/somewhere/else"
    assert _run_alone(show, {**env, "ADAKV_LIB_DIR": str(tmp_path)}).stdout.strip() == "None"


def _installed_site_dir() -> Path | None:
    """The site-packages folder adakv_local is installed in, or None when it is imported from elsewhere."""
    import sysconfig

    import adakv_local

    pkg = Path(adakv_local.__file__).resolve().parent
    for key in ("purelib", "platlib"):
        site = Path(sysconfig.get_paths()[key]).resolve()
        if pkg.parent == site:
            return site
    return None


def test_llama_cpp_alone_finds_the_installed_library():
    """`import llama_cpp` in a process that never imports adakv_local, as LangChain or llama-cpp-python's
    server would: the installed adakv-local.pth points it at adakv_local/lib."""
    site = _installed_site_dir()
    if site is None:
        pytest.skip("adakv_local is imported from a source tree, not installed in site-packages: the .pth file "
                    "comes with `pip install .`")
    assert (site / "adakv-local.pth").is_file(), f"{site}/adakv-local.pth is missing: reinstall adakv-local"
    env = _without("LLAMA_CPP_LIB_PATH", "ADAKV_LIB_DIR", "PYTHONPATH")
    _check_alone(_run_alone(ALONE, env), site / "adakv_local" / "lib")
    # adakv_local imported afterwards finds its own library already loaded: no LibraryMismatchError
    proc = _run_alone("import llama_cpp\nimport adakv_local._lib as l\nprint(l.bind_llama_cpp())\n", env)
    assert proc.returncode == 0, proc.stderr
    # llama-cpp-python's own server starts far enough to print its options
    if all(importlib.util.find_spec(m) for m in ("fastapi", "uvicorn", "sse_starlette", "pydantic_settings")):
        proc = subprocess.run([sys.executable, "-m", "llama_cpp.server", "--help"], capture_output=True, text=True,
                              env=env, cwd="/", timeout=120)
        assert proc.returncode == 0, proc.stderr
