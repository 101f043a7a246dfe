#!/usr/bin/env python3
"""Obtain the pinned llama.cpp source and apply our patch series to a copy of it.

Called by CMakeLists.txt at configure time; also usable by hand:

    python cmake/prepare_llama_cpp.py --patches patches --dest build/llama.cpp

What it guarantees:

* The pristine source is the llama.cpp vendored in the ``llama-cpp-python==0.3.36``
  sdist, downloaded by package name with pip once into a cache directory
  (``$ADAKV_CACHE_DIR`` or ``$XDG_CACHE_HOME/adakv-local`` or ``~/.cache/adakv-local``),
  sha256-checked, and unpacked once.  ``--source`` (or ``$LLAMA_CPP_SOURCE_DIR``)
  uses an existing checkout instead.  The pristine copy is never modified.
* ``--dest`` receives a copy of the pristine tree with ``patches/*.patch`` applied in
  name order.  A patch that does not apply stops everything with exit code 3 and a
  message naming the patch.  Files whose content did not change keep their
  modification time, so that an incremental build recompiles only what the patch
  series touched.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SDIST_NAME = "llama-cpp-python"
SDIST_VERSION = "0.3.36"
SDIST_FILE = "llama_cpp_python-0.3.36.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
# git commit of the llama.cpp submodule vendored in that sdist
LLAMA_CPP_COMMIT = "0c1e57098bba43ac29e6e3b677cdceebdd22334f"

# Parts of the llama.cpp tree that building ggml + libllama needs.
TREE_PARTS = ("CMakeLists.txt", "LICENSE", "cmake", "ggml", "include", "licenses", "src", "vendor")

EXIT_FETCH = 2
EXIT_PATCH = 3


class PrepareError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def cache_root() -> Path:
    if os.environ.get("ADAKV_CACHE_DIR"):
        return Path(os.environ["ADAKV_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "adakv-local"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def log(msg: str) -> None:
    print(f"[adakv-local] {msg}", file=sys.stderr, flush=True)


def fetch_sdist(cache: Path) -> Path:
    """Return the path of the verified sdist, downloading it with pip if needed."""
    target = cache / "sdist" / SDIST_FILE
    if target.exists():
        if sha256_file(target) == SDIST_SHA256:
            return target
        log(f"cached {target} has the wrong sha256; downloading it again")
        target.unlink()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--disable-pip-version-check", "-d", tmp, f"{SDIST_NAME}=={SDIST_VERSION}"]
        try:
            import scikit_build_core  # noqa: F401  (the sdist's metadata needs its backend)
            cmd.insert(4, "--no-build-isolation")
        except ImportError:
            pass
        log(f"downloading the llama.cpp source: {' '.join(cmd[2:])}")
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        got = Path(tmp) / SDIST_FILE
        if proc.returncode != 0 or not got.exists():
            tail = "\n".join(proc.stdout.strip().splitlines()[-15:])
            raise PrepareError(
                f"could not download {SDIST_NAME}=={SDIST_VERSION} with pip (exit {proc.returncode}).\n"
                f"{tail}\nSet LLAMA_CPP_SOURCE_DIR to an unpacked llama.cpp of that release to build offline.",
                EXIT_FETCH,
            )
        actual = sha256_file(got)
        if actual != SDIST_SHA256:
            raise PrepareError(
                f"{SDIST_FILE}: sha256 {actual} does not match the pinned {SDIST_SHA256}; refusing to build",
                EXIT_FETCH,
            )
        os.replace(got, target)
    return target


def unpack_pristine(cache: Path) -> Path:
    """Return the pristine llama.cpp tree in the cache, unpacking the sdist once."""
    dest = cache / f"llama.cpp-{SDIST_VERSION}-{SDIST_SHA256[:12]}"
    if (dest / ".complete").exists():
        return dest
    sdist = fetch_sdist(cache)
    prefix = f"llama_cpp_python-{SDIST_VERSION}/vendor/llama.cpp/"
    tmp = Path(tempfile.mkdtemp(dir=cache, prefix=".unpack-"))
    try:
        log(f"unpacking {sdist.name}")
        with tarfile.open(sdist) as tar:
            members = []
            for m in tar.getmembers():
                if not m.name.startswith(prefix):
                    continue
                rel = m.name[len(prefix):]
                if not rel or rel.split("/")[0] not in TREE_PARTS or not (m.isfile() or m.isdir()):
                    continue
                m.name = rel
                members.append(m)
            if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4: refuse unsafe members
                tar.extractall(tmp, members=members, filter="data")
            else:
                tar.extractall(tmp, members=members)
        (tmp / ".complete").write_text(LLAMA_CPP_COMMIT + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def check_source(src: Path) -> Path:
    if not (src / "CMakeLists.txt").is_file() or not (src / "src" / "llama.cpp").is_file():
        raise PrepareError(f"{src} does not look like a llama.cpp source tree (no src/llama.cpp)", EXIT_FETCH)
    return src


def apply_patches(tree: Path, patches: list[Path]) -> None:
    """Apply patches in order inside tree; raise PrepareError naming the first that fails."""
    env = dict(os.environ)
    # keep git from treating an enclosing repository (a build dir inside a checkout) as the target
    env["GIT_CEILING_DIRECTORIES"] = str(tree.parent)
    use_git = shutil.which("git") is not None
    for patch in patches:
        if use_git:
            cmd = ["git", "apply", "--whitespace=nowarn", "-p1", str(patch)]
        else:
            cmd = ["patch", "-p1", "--forward", "--batch", "--fuzz=0", "-i", str(patch)]
        proc = subprocess.run(cmd, cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0:
            raise PrepareError(
                f"patch {patch.name} does not apply to llama.cpp {LLAMA_CPP_COMMIT[:12]} "
                f"(llama-cpp-python {SDIST_VERSION}):\n{proc.stdout.strip()}",
                EXIT_PATCH,
            )
        log(f"applied {patch.name}")


def files_under(root: Path) -> set[str]:
    out = set()
    for dirpath, _dirs, names in os.walk(root):
        for n in names:
            out.add(os.path.relpath(os.path.join(dirpath, n), root))
    return out


def sync_tree(staged: Path, dest: Path) -> int:
    """Make dest equal to staged, touching only files whose content differs. Returns #changed."""
    dest.mkdir(parents=True, exist_ok=True)
    new, old = files_under(staged), files_under(dest)
    changed = 0
    for rel in sorted(new):
        s, d = staged / rel, dest / rel
        if d.exists() and d.stat().st_size == s.stat().st_size and d.read_bytes() == s.read_bytes():
            continue
        d.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(s, d)  # new mtime: the build sees the change
        changed += 1
    for rel in sorted(old - new):
        if rel != ".adakv-stamp":  # written after the sync
            (dest / rel).unlink()
            changed += 1
    return changed


def stamp_of(pristine: Path, patches: list[Path]) -> str:
    h = hashlib.sha256(str(pristine.resolve()).encode())
    for p in patches:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def prepare(patch_dir: Path, dest: Path, source: Path | None) -> Path:
    pristine = check_source(source) if source else unpack_pristine(cache_root())
    patches = sorted(patch_dir.glob("*.patch"))
    stamp = stamp_of(pristine, patches)
    stamp_file = dest / ".adakv-stamp"
    if stamp_file.exists() and stamp_file.read_text() == stamp:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".stage-"))
    try:
        for part in TREE_PARTS:
            s = pristine / part
            if s.is_dir():
                shutil.copytree(s, staged / part)
            elif s.is_file():
                shutil.copy2(s, staged / part)
        apply_patches(staged, patches)
        commit = LLAMA_CPP_COMMIT if source is None else f"unknown ({source})"
        (staged / ".adakv-llama-commit").write_text(commit + "\n")
        n = sync_tree(staged, dest)
        stamp_file.write_text(stamp)
        log(f"llama.cpp source ready in {dest} ({len(patches)} patches, {n} files updated)")
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return dest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--patches", type=Path, help="directory of NNNN-*.patch files")
    ap.add_argument("--dest", type=Path, help="where the patched tree goes")
    ap.add_argument("--print-sdist", action="store_true",
                    help="only fetch the verified llama-cpp-python sdist into the cache and print its path")
    ap.add_argument("--source", type=Path, default=None,
                    help="pristine llama.cpp tree to use instead of the sdist (default: $LLAMA_CPP_SOURCE_DIR)")
    args = ap.parse_args(argv)
    env_source = os.environ.get("LLAMA_CPP_SOURCE_DIR")
    source = args.source or (Path(env_source) if env_source else None)
    try:
        if args.print_sdist:
            print(fetch_sdist(cache_root()))
            return 0
        if args.patches is None or args.dest is None:
            ap.error("--patches and --dest are required")
        prepare(args.patches, args.dest, source)
    except PrepareError as e:
        print(f"adakv-local: error: {e}", file=sys.stderr)
        return e.code
    return 0


if __name__ == "__main__":
    sys.exit(main())
