"""adakv_local.eval.corpus: real documents found on the machine, missing ones reported, cut to a token limit."""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import pytest

from adakv_local.eval.corpus import KINDS, SPECS, Spec, _file, cut_to_tokens, find_documents


def whitespace_count(text: str) -> int:
    return len(text.split())


def test_a_present_file_is_read_and_a_missing_one_is_reported(tmp_path: Path):
    plain = tmp_path / "a.txt"
    plain.write_text("alpha beta\ngamma\n")
    packed = tmp_path / "b.txt.gz"
    packed.write_bytes(gzip.compress(b"delta epsilon\n"))
    specs = (
        Spec("a", "prose", "pkg-a", "q?", _file(str(tmp_path / "nope.txt"), str(plain))),
        Spec("b", "log", "pkg-b", "q?", _file(str(packed))),
        Spec("c", "table", "pkg-c", "q?", _file(str(tmp_path / "missing.txt"))),
    )
    found, missing = find_documents(specs=specs)
    assert [(d.name, d.source, d.text) for d in found] == [("a", str(plain), "alpha beta\ngamma"),
                                                          ("b", str(packed), "delta epsilon")]
    assert [m.name for m in missing] == ["c"]
    assert str(tmp_path / "missing.txt") in missing[0].reason and "pkg-c" in missing[0].reason


def test_a_corrupt_gzip_is_missing_not_a_crash(tmp_path: Path):
    bad = tmp_path / "x.gz"
    bad.write_bytes(b"not gzip at all")
    found, missing = find_documents(specs=(Spec("x", "log", "pkg", "q?", _file(str(bad))),))
    assert not found and missing[0].name == "x"


def test_unknown_names_are_refused():
    with pytest.raises(ValueError, match="unknown name"):
        find_documents(["no-such-document"])


def test_specs_are_well_formed():
    assert len({s.name for s in SPECS}) == len(SPECS) >= 10
    assert {s.kind for s in SPECS} <= set(KINDS)
    assert {s.kind for s in SPECS} >= {"prose", "reference", "markup", "table", "log"}
    assert all(s.question.endswith("?") for s in SPECS)
    assert all(q.endswith("?") and q not in (s.question, *s.more_questions[:i])
               for s in SPECS for i, q in enumerate(s.more_questions))
    # the documents of 3000 tokens or more (the measured ones) have two more questions each
    assert sum(len(s.more_questions) == 2 for s in SPECS) >= 10


def test_documents_on_this_machine_name_their_source():
    found, missing = find_documents()
    assert len(found) + len(missing) == len(SPECS)
    for d in found:
        path = d.source.split("#")[0]
        assert Path(path).is_file(), d
        assert len(d.text) > 1000
    if importlib.util.find_spec("pydoc_data.topics") is not None:  # Python's own documentation is always here
        assert {"py-formatstrings", "py-debugger"} <= {d.name for d in found}


@pytest.mark.parametrize("limit", [1, 3, 7, 50, 10_000])
def test_cut_to_tokens_keeps_the_longest_run_of_whole_lines(limit: int):
    text = "\n".join(" ".join(f"w{i}_{j}" for j in range(1 + i % 4)) for i in range(40))
    out = cut_to_tokens(text, whitespace_count, limit)
    assert whitespace_count(out) <= limit
    if whitespace_count(text) <= limit:
        assert out == text
        return
    assert text.startswith(out)
    lines = text.splitlines()
    k = out.count("\n") + 1
    if out == " ".join(lines[0].split()[:limit]) and whitespace_count(lines[0]) > limit:
        return  # a first line longer than the limit is cut inside
    assert out.splitlines() == lines[:k]
    assert whitespace_count("\n".join(lines[: k + 1])) > limit  # one more line would not fit


def test_cut_to_tokens_cuts_a_single_long_line():
    out = cut_to_tokens("a b c d e f g", whitespace_count, 3)
    assert out == "a b c"


def test_cut_to_tokens_refuses_a_zero_limit():
    with pytest.raises(ValueError, match="max_tokens"):
        cut_to_tokens("a", whitespace_count, 0)
