"""The README's promises that code can check: its Python example runs, its commands exist."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_python_example_runs_with_a_bounded_reply(tiny_llama, monkeypatch, capsys):
    """The first Python example, with the registry model swapped for the tiny test model."""
    from adakv_local import models

    asked: list[str] = []

    def model_path(name: str, **kwargs: Any) -> Path:
        assert name in models.MODELS, name
        asked.append(name)
        return tiny_llama

    monkeypatch.setattr(models, "model_path", model_path)
    code = python_blocks()[0]
    assert "max_tokens=" in code and "model_path(" in code
    scope: dict[str, Any] = {"long_document": " ".join(f"Line {i}: the keeper logged wind {i % 9}." for i in range(60))}
    exec(compile(code, str(README), "exec"), scope)
    assert asked == ["smollm2-135m"]
    out = scope["out"]
    assert out["usage"]["completion_tokens"] <= 256  # the tiny model never stops on its own: max_tokens did
    assert out["choices"][0]["finish_reason"] == "length"
    assert scope["llm"].adakv_stats is not None and len(scope["positions"]) > 0
    scope["llm"].close()


def test_the_saved_conversations_example_runs(tiny_llama, monkeypatch, capsys):
    """The Python example of saved conversation states (after the first one, which sets `path`)."""
    from adakv_local import models

    monkeypatch.setattr(models, "model_path", lambda name, **kwargs: tiny_llama)
    blocks = python_blocks()
    code = next(b for b in blocks if "set_cache(" in b)
    doc = " ".join(f"Line {i}: the keeper logged wind {i % 9}." for i in range(60))
    scope: dict[str, Any] = {"long_document": doc}
    exec(compile(blocks[0].replace("max_tokens=256", "max_tokens=2"), str(README), "exec"), scope)
    scope["llm"].close()
    scope["doc_a_messages"] = [{"role": "user", "content": doc}]
    scope["doc_b_messages"] = [{"role": "user", "content": doc.replace("keeper", "pilot")}]
    exec(compile(code.replace("max_tokens=256", "max_tokens=4"), str(README), "exec"), scope)
    llm = scope["llm"]
    assert [e.tokens > 500 for e in llm.cache.entries()] == [True, True]
    assert "CacheEntry(" in capsys.readouterr().out
    llm.close()


def test_the_examples_get_their_models_from_the_registry():
    for code in python_blocks():
        for path in re.findall(r'model_path="([^"]+)"', code):
            raise AssertionError(f"a README example loads {path!r}, a file the reader does not have")


def test_no_test_counts_that_go_stale():
    """Counts of tests drift with every commit (729 vs 884 collected): `pytest --collect-only -q` says."""
    text = README.read_text()
    stale = re.findall(r"\b\d+ (?:tests|of its tests)\b|its \d+ tests", text)
    assert not stale, stale
