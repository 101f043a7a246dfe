"""Instruction fidelity: how close a compressed cache's *answers* stay to the full cache's.

``eval fidelity`` (:mod:`adakv_local.eval.evaluate`) teacher-forces a continuation of raw text. Users
ask for something after a document: "summarize the document above", or a question. Here the
prompt is a real document (:mod:`adakv_local.eval.corpus`) followed by an instruction, in the model's
chat template (``mode="chat"``) or as a plain completion prompt (``mode="raw"``, base models).
The full cache answers greedily (until an end-of-generation token or ``max_answer`` tokens); that
answer is teacher-forced after the compressed prompt of every (setting, budget), and
KL(full || compressed), the largest KL, top-1 agreement and the attention-output L1 error are
recorded, exactly as :func:`adakv_local.eval.evaluate.run_fidelity` does for raw text. The answer's
end token is one of the forced positions: whether the model stops is part of the answer.

A *setting* is a named set of :class:`~adakv_local.config.AdaKVConfig` options other than the
budget (``("default", {})``, ``("k15", {"kernel": 15})``; a window no larger than the run's, and one
GQA reduction for all, which the graph is built with), so
that two selections can be compared prompt by prompt (:func:`paired`).

Prompts that share their beginning (the same document with different instructions) are evaluated
once up to where they part, and the state saved.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..prompts import SUMMARY_INSTRUCTION, SYSTEM, chat_formatter
from .corpus import Document, cut_to_tokens
from .fidelity import attention_l1, compare

QUESTION_INSTRUCTION = "Answer this question about the document above in one sentence: {question}"
RAW_SUMMARY = "\n\nA short summary of the document above:\n"
RAW_QUESTION = "\n\nQuestion: {question}\nAnswer:"
TASKS: tuple[str, ...] = ("summary", "question")
MODES: tuple[str, ...] = ("chat", "raw")

Setting = tuple[str, Mapping[str, Any]]


@dataclass(frozen=True)
class InstructionPrompt:
    """A document followed by an instruction, as tokens. name: ``<document>/<task>``."""

    name: str
    document: str
    kind: str
    task: str
    tokens: tuple[int, ...]
    document_tokens: int


def render(llm: Any, text: str, task: str, question: str, mode: str) -> list[int]:
    """The prompt's tokens, as ``create_chat_completion`` (chat) or ``create_completion`` (raw) sends them."""
    if task not in TASKS:
        raise ValueError(f"task: expected one of {', '.join(TASKS)}, got {task!r}")
    if mode == "raw":
        tail = RAW_SUMMARY if task == "summary" else RAW_QUESTION.format(question=question)
        return list(llm.tokenize((text + tail).encode("utf-8"), add_bos=True))
    if mode != "chat":
        raise ValueError(f"mode: expected one of {', '.join(MODES)}, got {mode!r}")
    fmt = chat_formatter(llm)
    if fmt is None:
        raise ValueError("mode 'chat' needs a model with a chat template (tokenizer.chat_template); use mode 'raw'")
    instruction = SUMMARY_INSTRUCTION if task == "summary" else QUESTION_INSTRUCTION.format(question=question)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"{text}\n\n{instruction}"}]
    r = fmt(messages=messages)
    return list(llm.tokenize(r.prompt.encode("utf-8"), add_bos=not r.added_special, special=True))


def build_prompts(llm: Any, documents: Iterable[Document], *, tasks: Sequence[str] = TASKS, mode: str = "chat",
                  max_doc_tokens: int = 4000, min_doc_tokens: int = 3000, questions: int = 1
                  ) -> list[InstructionPrompt]:
    """One prompt per (document, task); for the task ``question``, one per question of the document,
    its first ``questions`` ones (``Document.questions``; named ``<document>/question``,
    ``<document>/question-2``, ...). Each document is cut to at most ``max_doc_tokens`` (at a line);
    a document shorter than ``min_doc_tokens`` is left out."""
    if isinstance(questions, bool) or not isinstance(questions, int) or questions < 1:
        raise ValueError(f"questions: expected an int >= 1, got {questions!r}")

    def count(t: str) -> int:
        return len(llm.tokenize(t.encode("utf-8"), add_bos=False))

    out = []
    for d in documents:
        text = cut_to_tokens(d.text, count, max_doc_tokens)
        n_doc = count(text)
        if n_doc < min_doc_tokens:
            continue
        for task in tasks:
            asked = d.questions[:questions] if task == "question" else ("",)
            for i, question in enumerate(asked):
                toks = render(llm, text, task, question, mode)
                name = f"{d.name}/{task}" + (f"-{i + 1}" if i else "")
                out.append(InstructionPrompt(name, d.name, d.kind, task, tuple(toks), n_doc))
    return out


def _shared_prefix(seqs: Sequence[Sequence[int]]) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        t = seqs[0][i]
        if any(s[i] != t for s in seqs[1:]):
            return i
    return n


@contextlib.contextmanager
def prefix_mode(llm: Any) -> Iterator[None]:
    """Evaluate without compressing and without the logits of every token (llama-cpp-python's
    ``_logits_all``): the output layer over thousands of document tokens is most of a prefill's cost
    for a small model, and only the logits after the window and of the answer are compared."""
    saved = llm._logits_all
    llm._logits_all = False
    try:
        with llm.adakv_suspended():
            yield
    finally:
        llm._logits_all = saved


def _greedy(llm: Any, first_logits: np.ndarray, max_tokens: int) -> list[int]:
    """Greedy tokens after the current state, ending with (and including) an end-of-generation token."""
    import llama_cpp

    from ..llama import decoding_context

    vocab = llm._model.vocab
    out: list[int] = []
    last = first_logits
    with decoding_context(llm):  # as generate decodes: no budget check per token
        while len(out) < max_tokens:
            tok = int(last.argmax())
            out.append(tok)
            if llama_cpp.llama_vocab_is_eog(vocab, tok) or len(out) == max_tokens:
                break
            llm.eval([tok])
            last = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
    return out


def run_instruction_fidelity(
    model_path: str,
    prompts: Sequence[InstructionPrompt],
    settings: Sequence[Setting],
    budgets: Sequence[int],
    *,
    window: int = 32,
    max_answer: int = 128,
    sample_budgets: Sequence[int] = (),
    n_threads: int = 2,
    n_gpu_layers: int = 0,
    progress: Callable[[int, int, str], None] | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(records, answers).

    records: one per (prompt, setting, budget): prompt, document, kind, task, setting, options,
    budget, kl_mean, kl_max, top1, l1_attn, footprint, prompt_tokens, answer_tokens.
    answers: one per prompt: the full cache's greedy answer (text), and for every setting and
    every budget in ``sample_budgets`` the compressed cache's own greedy answer.
    """
    from ..config import AdaKVConfig
    from ..llama import Llama
    from .evaluate import check_window_option, continue_from, teacher_force

    if max_answer < 2:
        raise ValueError(f"max_answer: expected an int >= 2, got {max_answer}")
    for label, opts in settings:
        if "budget" in opts:
            raise ValueError(f"settings[{label!r}]: the budget is set by the run, not by a setting")
        check_window_option(opts, window, f"settings[{label!r}]")
    configs = {label: AdaKVConfig(budget=max(budgets), **{"window": window, **dict(opts)}) for label, opts in settings}
    gqa = {c.gqa for c in configs.values()}
    if len(gqa) > 1:
        raise ValueError(f"settings: gqa {sorted(gqa)} in one run; the graph reduces the window's scores one way per "
                         "run (adakv_config.gqa): run each in a run of its own")
    longest = max(len(p.tokens) for p in prompts)
    n_ctx = ((longest + max_answer + 64) // 256 + 1) * 256
    llm = Llama(model_path=model_path, n_ctx=n_ctx, n_batch=512, n_threads=n_threads, n_threads_batch=n_threads,
                n_gpu_layers=n_gpu_layers, logits_all=True, adakv_budget=max(budgets), adakv_window=window,
                adakv_gqa=gqa.pop() if gqa else None, verbose=False)
    groups: dict[str, list[InstructionPrompt]] = {}
    for p in prompts:
        groups.setdefault(p.document, []).append(p)
    total = len(prompts) * (1 + len(settings) * len(budgets))
    done = 0
    records: list[dict[str, Any]] = []
    answers: list[dict[str, Any]] = []

    def detok(toks: Sequence[int]) -> str:
        return llm.detokenize(list(toks)).decode("utf-8", errors="replace")

    try:
        for group in groups.values():
            for p in group:
                if len(p.tokens) <= window:
                    raise ValueError(f"prompt {p.name} has {len(p.tokens)} tokens, not more than the window ({window})")
            shared = min(_shared_prefix([p.tokens for p in group]), min(len(p.tokens) for p in group) - window)
            llm.reset()
            with prefix_mode(llm):
                llm.eval(list(group[0].tokens[:shared]))
            doc_state = llm.save_state()
            for p in group:
                toks = list(p.tokens)
                llm.load_state(doc_state)
                with prefix_mode(llm):
                    if len(toks) - window > shared:
                        llm.eval(toks[shared:-window])
                state = llm.save_state()
                win = toks[-window:]

                last = continue_from(llm, state, win, None)
                ans = _greedy(llm, last, max_answer)
                n_ans = len(ans)
                # the reference logits come from the same path as every compressed run's (the window,
                # then the answer teacher-forced in one batch), not from the token-by-token decode
                # that chose the answer: batch shapes change the float rounding
                continue_from(llm, state, win, None)
                full_attn = teacher_force(llm, ans[:-1]) if n_ans > 1 else None
                full = np.array(llm.scores[len(toks) - 1 : len(toks) - 1 + n_ans], dtype=np.float32)
                entry: dict[str, Any] = {"prompt": p.name, "document": p.document, "task": p.task,
                                         "full": detok(ans), "answer_tokens": n_ans, "compressed": {}}
                done += 1
                if progress:
                    progress(done, total, f"{p.name}: full cache answered in {n_ans} tokens")
                for label, opts in settings:
                    for budget in budgets:
                        cfg = dataclasses.replace(configs[label], budget=budget)
                        continue_from(llm, state, win, cfg)
                        footprint = llm.adakv_stats.cells_after  # this evaluation's record, compressed or not
                        got_attn = teacher_force(llm, ans[:-1]) if n_ans > 1 else None
                        got = np.array(llm.scores[len(toks) - 1 : len(toks) - 1 + n_ans], dtype=np.float32)
                        f = compare(full, got)
                        l1 = attention_l1(full_attn, got_attn) if full_attn is not None else float("nan")
                        records.append({
                            "prompt": p.name, "document": p.document, "kind": p.kind, "task": p.task,
                            "setting": label, "options": dict(opts), "budget": budget, "kl_mean": f.kl_mean,
                            "kl_max": f.kl_max, "top1": f.top1, "l1_attn": l1, "footprint": footprint,
                            "prompt_tokens": len(toks), "answer_tokens": n_ans,
                        })  # fmt: skip
                        if budget in sample_budgets:
                            first = continue_from(llm, state, win, cfg)
                            with llm.adakv_suspended():
                                own = _greedy(llm, first, max_answer)
                            entry["compressed"][f"{label}@{budget}"] = detok(own)
                        done += 1
                        if progress:
                            progress(done, total, f"{p.name}: {label} @ {budget}: KL {f.kl_mean:.4f}")
                answers.append(entry)
    finally:
        llm.close()
    return records, answers


# -- summaries -----------------------------------------------------------------------------------


def sign_test_p(wins: int, losses: int) -> float:
    """Two-sided exact sign test over the untied pairs (nan when all are tied)."""
    n, k = wins + losses, min(wins, losses)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n) if n else float("nan")


def summarize(records: Iterable[dict[str, Any]], key: str = "kl_mean") -> list[dict[str, Any]]:
    """Mean, 95% normal CI and top-1 per (task, setting, budget)."""
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["task"], r["setting"], r["budget"]), []).append(r)
    out = []
    for (task, setting, budget), rs in sorted(groups.items()):
        a = np.array([r[key] for r in rs], dtype=np.float64)
        ci = float(1.96 * a.std(ddof=1) / math.sqrt(len(a))) if len(a) > 1 else float("nan")
        out.append({"task": task, "setting": setting, "budget": budget, "n": len(rs), key: float(a.mean()),
                    f"{key}_ci95": ci, "top1": float(np.mean([r["top1"] for r in rs]))})
    return out


def paired(records: Iterable[dict[str, Any]], a: str, b: str, key: str = "kl_mean") -> list[dict[str, Any]]:
    """Setting ``a`` against ``b`` per (task, budget) on the prompts both ran: means, ratio, a's wins,
    losses and the sign test."""
    by: dict[tuple[str, str, int, str], float] = {}
    for r in records:
        by[(r["setting"], r["task"], r["budget"], r["prompt"])] = r[key]
    out = []
    for task, budget in sorted({(t, bud) for (s, t, bud, _) in by if s == a}):
        names = [p for (s, t, bud, p) in by if s == a and t == task and bud == budget and (b, task, budget, p) in by]
        if not names:
            continue
        x = np.array([by[(a, task, budget, p)] for p in names])
        y = np.array([by[(b, task, budget, p)] for p in names])
        wins, losses = int((x < y).sum()), int((x > y).sum())
        out.append({"task": task, "budget": budget, "a": a, "b": b, "n": len(names), "a_mean": float(x.mean()),
                    "b_mean": float(y.mean()), "ratio": float(x.mean() / y.mean()) if y.mean() > 0 else 1.0,
                    "a_wins": wins, "a_losses": losses, "sign_p": sign_test_p(wins, losses)})
    return out
