"""adakv_local.eval.instruct: instruction prompts over documents, and their fidelity measurement, on the
tiny random-weight model (the numbers mean nothing there; the bookkeeping is what is checked)."""

from __future__ import annotations

import dataclasses
import random

import pytest

from adakv_local.eval.corpus import Document
from adakv_local.eval.instruct import (
    QUESTION_INSTRUCTION,
    SUMMARY_INSTRUCTION,
    build_prompts,
    paired,
    run_instruction_fidelity,
    sign_test_p,
    summarize,
)

WORDS = "cache head layer budget window token prompt score kernel cell summary answer".split()


def _doc(name: str, seed: int, n_words: int = 260) -> Document:
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(12)) + "." for _ in range(n_words // 12)]
    return Document(name=name, kind="prose", source=f"test:{name}", text="\n".join(lines),
                    question="Which word comes first?", package="tests")


@pytest.fixture(scope="module")
def vocab(tiny_llama):
    from adakv_local.llama import Llama

    llm = Llama(model_path=str(tiny_llama), vocab_only=True, verbose=False)
    yield llm
    llm.close()


def test_chat_prompts_end_with_the_instruction_after_the_document(vocab):
    doc = _doc("d", 0)
    prompts = build_prompts(vocab, [doc], mode="chat", max_doc_tokens=10_000, min_doc_tokens=1)
    assert [p.name for p in prompts] == ["d/summary", "d/question"]
    texts = [vocab.detokenize(list(p.tokens)).decode() for p in prompts]
    assert SUMMARY_INSTRUCTION in texts[0] and texts[0].index(SUMMARY_INSTRUCTION) > texts[0].index(doc.text[-30:])
    assert QUESTION_INSTRUCTION.format(question=doc.question) in texts[1]
    assert all(t.rstrip().endswith("assistant") for t in texts)  # ChatML: the reply starts next


def test_each_of_a_documents_questions_is_a_prompt(vocab):
    doc = dataclasses.replace(_doc("d", 0), more_questions=("Which word comes last?", "How many lines are there?"))
    prompts = build_prompts(vocab, [doc], mode="chat", max_doc_tokens=10_000, min_doc_tokens=1, questions=3)
    assert [p.name for p in prompts] == ["d/summary", "d/question", "d/question-2", "d/question-3"]
    assert [p.task for p in prompts] == ["summary", "question", "question", "question"]
    for p, q in zip(prompts[1:], doc.questions, strict=True):
        assert vocab.detokenize(list(p.tokens)).decode().count(QUESTION_INSTRUCTION.format(question=q)) == 1
    # more than the document has: the ones it has; the default: the first only
    assert len(build_prompts(vocab, [doc], tasks=("question",), min_doc_tokens=1, questions=5)) == 3
    assert [p.name for p in build_prompts(vocab, [doc], tasks=("question",), min_doc_tokens=1)] == ["d/question"]
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="questions"):
            build_prompts(vocab, [doc], min_doc_tokens=1, questions=bad)


def test_documents_are_cut_and_short_ones_left_out(vocab):
    long, short = _doc("long", 1, 600), _doc("short", 2, 12)
    n_short = len(vocab.tokenize(short.text.encode(), add_bos=False))
    prompts = build_prompts(vocab, [long, short], tasks=("summary",), mode="raw", max_doc_tokens=n_short * 3,
                            min_doc_tokens=n_short + 1)
    assert [p.document for p in prompts] == ["long"]
    assert n_short * 2 <= prompts[0].document_tokens <= n_short * 3


def test_raw_mode_and_bad_arguments(vocab):
    (p,) = build_prompts(vocab, [_doc("d", 3)], tasks=("question",), mode="raw", min_doc_tokens=1)
    assert vocab.detokenize(list(p.tokens)).decode().endswith("Answer:")
    with pytest.raises(ValueError, match="task"):
        build_prompts(vocab, [_doc("d", 3)], tasks=("poem",), min_doc_tokens=1)
    with pytest.raises(ValueError, match="mode"):
        build_prompts(vocab, [_doc("d", 3)], mode="markdown", min_doc_tokens=1)


SETTINGS = [("default", {}), ("k15", {"kernel": 15}), ("full", {"method": "full"}), ("w8", {"window": 8})]


@pytest.fixture(scope="module")
def run(tiny_llama, vocab):
    prompts = build_prompts(vocab, [_doc("a", 4), _doc("b", 5)], mode="chat", min_doc_tokens=1)
    records, answers = run_instruction_fidelity(str(tiny_llama), prompts, SETTINGS, [40, 80], window=16,
                                                max_answer=12, sample_budgets=[40])
    return prompts, records, answers


def test_one_record_per_prompt_setting_and_budget(run):
    prompts, records, answers = run
    assert len(records) == len(prompts) * len(SETTINGS) * 2
    assert [a["prompt"] for a in answers] == [p.name for p in prompts]
    for r in records:
        assert 0.0 <= r["top1"] <= 1.0 and r["kl_mean"] >= 0.0 and r["kl_max"] >= r["kl_mean"] - 1e-12
        assert 2 <= r["answer_tokens"] <= 12
    for a in answers:
        assert set(a["compressed"]) == {"default@40", "k15@40", "full@40", "w8@40"}


def test_the_full_method_reproduces_the_full_cache_exactly(run):
    _, records, answers = run
    for r in records:
        if r["setting"] == "full":
            assert r["kl_mean"] < 1e-6 and r["top1"] == 1.0 and r["l1_attn"] < 1e-6, r
    for a in answers:  # the full cache's own greedy answer, generated again, is the same text
        assert a["compressed"]["full@40"] == a["full"]


def test_eviction_changes_something(run):
    _, records, _ = run
    assert max(r["kl_mean"] for r in records if r["setting"] == "default" and r["budget"] == 40) > 1e-4


def test_shared_document_prefix_gives_the_same_numbers_as_prompts_run_alone(tiny_llama, run):
    prompts, records, _ = run
    alone, _ = run_instruction_fidelity(str(tiny_llama), [prompts[1]], SETTINGS[:1], [40], window=16, max_answer=12)
    ref = next(r for r in records if r["prompt"] == prompts[1].name and r["setting"] == "default" and
               r["budget"] == 40)
    assert alone[0]["kl_mean"] == pytest.approx(ref["kl_mean"], rel=1e-4, abs=1e-7)
    assert alone[0]["top1"] == ref["top1"]


def test_settings_may_not_set_the_budget(tiny_llama, vocab):
    prompts = build_prompts(vocab, [_doc("a", 4)], tasks=("summary",), min_doc_tokens=1)
    with pytest.raises(ValueError, match="budget"):
        run_instruction_fidelity(str(tiny_llama), prompts, [("x", {"budget": 64})], [40], window=16)
    with pytest.raises(ValueError, match="window"):
        run_instruction_fidelity(str(tiny_llama), prompts, [("x", {"window": 32})], [40], window=16)
    with pytest.raises(ValueError, match=r"gqa \['max', 'mean'\] in one run"):
        run_instruction_fidelity(str(tiny_llama), prompts, [("a", {}), ("b", {"gqa": "mean"})], [40], window=16)


def test_a_settings_gqa_reaches_the_graph(tiny_llama, vocab):
    prompts = build_prompts(vocab, [_doc("a", 4)], tasks=("summary",), min_doc_tokens=1)
    kl = {g: run_instruction_fidelity(str(tiny_llama), prompts, [(g, {"gqa": g})], [40], window=16, max_answer=4)[0][0]
          for g in ("mean", "max")}
    assert kl["mean"]["options"] == {"gqa": "mean"} and kl["max"]["options"] == {"gqa": "max"}
    assert kl["mean"]["kl_mean"] != kl["max"]["kl_mean"]


def test_summarize_and_paired():
    recs = [{"task": "summary", "setting": s, "budget": 256, "prompt": f"p{i}", "kl_mean": v, "top1": 0.5}
            for s, vals in (("new", [0.1, 0.2, 0.3, 0.4]), ("old", [0.2, 0.3, 0.3, 0.5])) for i, v in enumerate(vals)]
    table = summarize(recs)
    assert [(t["setting"], t["n"]) for t in table] == [("new", 4), ("old", 4)]
    assert table[0]["kl_mean"] == pytest.approx(0.25)
    (p,) = paired(recs, "new", "old")
    assert (p["a_wins"], p["a_losses"], p["n"]) == (3, 0, 4)
    assert p["ratio"] == pytest.approx(0.25 / 0.325)
    assert p["sign_p"] == pytest.approx(0.25)


def test_sign_test():
    assert sign_test_p(5, 0) == pytest.approx(2 / 32)
    assert sign_test_p(3, 3) == 1.0
    assert sign_test_p(0, 0) != sign_test_p(0, 0)  # nan: all tied
