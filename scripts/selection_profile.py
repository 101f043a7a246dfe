#!/usr/bin/env python3
"""What eviction keeps for an instruction after a real document (docs/SELECTION.md).

Reproduces docs/SELECTION.md, *The cause: a "summarize" window looks at the last lines*, *Numbers
written one token per digit: pooling in two scales (`max2`)*, *Numbers of four digits or more
(`long-numbers`): the default*.

    python scripts/selection_profile.py scores --documents gpl-2,man-tar --out /tmp/prof   # runs the model
    python scripts/selection_profile.py report /tmp/prof --budgets 256,512,1024 \\
        --setting default --setting k15:kernel=15

    python scripts/selection_profile.py span-changes /tmp/prof --budget 256 \\
        --setting old:spans=none --setting new:spans=long-numbers

``scores``: for every (document, task) prompt of adakv_local.eval.instruct (chat mode, SmolLM2 by
default) evaluates the prompt without compression and reads the observation window's scores of
every layer and KV head (the scores the eviction ranks by: window-summed, GQA-reduced); saves them
with the tokens and the document's span in OUT/<document>__<task>.npz.
``report``: from those files, without the model, runs the allocation of every setting and budget
(adakv_local.policies.keep_sets, the code the live model runs) and prints, averaged over prompts
and over the (layer, KV head) pairs: how the kept cells are laid out (runs of consecutive cells),
where they are (chat template before the document, the document's first and last 5%, the
instruction), what they are (words, digits, markup/punctuation, whitespace) against the
document's own shares, how many of the document's lines keep at least one cell, and where the
window's attention goes.
``span-changes``: which cells the second setting keeps that the first does not, and the other way
round (summed over the (layer, head) pairs), each shown with its neighbours.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from adakv_local.config import AdaKVConfig
from adakv_local.eval.corpus import find_documents
from adakv_local.policies import AllocationConfig, keep_sets
from adakv_local.spans import SpanFinder


def _token_class(piece: str) -> str:
    if not piece.strip():
        return "space"
    if any(c.isdigit() for c in piece) and not any(c.isalpha() for c in piece):
        return "digit"
    if not any(c.isalnum() for c in piece):
        return "markup"
    return "word"


def _window_scores(llm: Any, toks: list[int], window: int) -> tuple[np.ndarray, list[str]]:
    """The observation window's scores of every cell after the whole prompt is evaluated without
    compression (the prefix as llama-cpp-python would, the window scored), and each token's text."""
    import llama_cpp

    from adakv_local.eval.instruct import prefix_mode

    llm.reset()
    with prefix_mode(llm):
        llm.eval(toks[:-window])
    kv = llm.adakv_kvcache
    kv.arm_scores(window)
    llama_cpp.Llama.eval(llm, toks[-window:])
    pieces = [llm.detokenize([t]).decode("utf-8", errors="replace") for t in toks]
    return kv.read_scores(len(toks)), pieces


def cmd_scores(a: argparse.Namespace) -> int:
    from adakv_local.eval.instruct import build_prompts
    from adakv_local.llama import Llama
    from adakv_local.models import resolve_model

    model = str(resolve_model(a.model))
    docs, missing = find_documents(x for x in a.documents.split(",") if x)
    for m in missing:
        print(f"missing document {m.name}: {m.reason}", file=sys.stderr)
    llm = Llama(model_path=model, n_ctx=a.max_doc_tokens + 512, n_batch=512, n_threads=a.threads,
                n_threads_batch=a.threads, adakv_budget=10**6, adakv_window=a.window, adakv_gqa=a.gqa, verbose=False)
    a.out.mkdir(parents=True, exist_ok=True)
    try:
        prompts = build_prompts(llm, docs, tasks=a.tasks.split(","), max_doc_tokens=a.max_doc_tokens,
                                min_doc_tokens=a.min_doc_tokens, questions=a.questions)
        for p in prompts:
            toks = list(p.tokens)
            doc = next(d for d in docs if d.name == p.document)
            # the document's span: where its first and last 16 tokens sit in the prompt
            body = [t for t in llm.tokenize(doc.text.encode("utf-8"), add_bos=False)][: p.document_tokens]
            start = next(i for i in range(len(toks)) if toks[i : i + 16] == body[:16])
            end = start + p.document_tokens
            scores, pieces = _window_scores(llm, toks, a.window)
            np.savez_compressed(a.out / f"{p.name.replace('/', '__')}.npz", scores=scores, tokens=np.array(toks),
                                pieces=np.array(pieces), doc_span=np.array([start, end]), window=a.window)
            print(f"{p.name}: {len(toks)} tokens, document cells [{start}, {end})", file=sys.stderr, flush=True)
    finally:
        llm.close()
    return 0


def cmd_task_scores(a: argparse.Namespace) -> int:
    """The window scores of one generated task sample (chat mode), and where its answer's tokens are."""
    from adakv_local.eval.tasks import make_sample
    from adakv_local.llama import Llama
    from adakv_local.models import resolve_model
    from adakv_local.prompts import chat_formatter

    llm = Llama(model_path=str(resolve_model(a.model)), n_ctx=a.length + 512, n_batch=512, n_threads=a.threads,
                n_threads_batch=a.threads, adakv_budget=10**6, adakv_window=a.window, verbose=False)
    a.out.mkdir(parents=True, exist_ok=True)
    try:
        for depth in (float(x) for x in a.depths.split(",")):
            sample = make_sample(a.task, llm, a.length, depth, a.seed, mode="chat")
            r = chat_formatter(llm)(messages=sample.messages())
            toks = list(llm.tokenize(r.prompt.encode("utf-8"), add_bos=not r.added_special, special=True))
            scores, pieces = _window_scores(llm, toks, a.window)
            text = "".join(pieces)
            at = text.index(sample.answers[0])
            ends = np.cumsum([len(x) for x in pieces])
            first = int(np.searchsorted(ends, at, side="right"))
            last = int(np.searchsorted(ends, at + len(sample.answers[0]) - 1, side="right"))
            np.savez_compressed(a.out / f"{a.task}-{a.seed}-{depth}.npz", scores=scores, tokens=np.array(toks),
                                pieces=np.array(pieces), answer_span=np.array([first, last + 1]), window=a.window)
            print(f"{a.task} depth {depth}: answer {sample.answers[0]!r} at tokens [{first}, {last + 1})",
                  file=sys.stderr, flush=True)
    finally:
        llm.close()
    return 0


def cmd_answer_kept(a: argparse.Namespace) -> int:
    """For task-scores files: how many (layer, head) pairs keep each answer token, per setting."""
    settings = a.settings or [("default", {})]
    for f in sorted(a.dir.glob("*.npz")):
        z = np.load(f)
        pieces = [str(x) for x in z["pieces"]]
        lo, hi = (int(x) for x in z["answer_span"])
        print(f"{f.stem}: tokens {[pieces[i] for i in range(lo - 3, hi + 3)]}")
        for label, opts in settings:
            kept = _kept(z, opts, a.budget)
            counts = [sum(int(np.isin(i, c)) for layer in kept for c in layer) for i in range(lo - 3, hi + 3)]
            whole = sum(int(np.isin(np.arange(lo, hi), c).all()) for layer in kept for c in layer)
            print(f"  {label:>14} @ {a.budget}: heads keeping each token {counts}; keeping all digits: {whole}")
    return 0


def _kept(z: Any, opts: dict[str, Any], budget: int) -> list[list[np.ndarray]]:
    """What the model keeps at this budget with these options from a saved file's window scores: the
    allocation with the options' spans (their ids from the saved tokens' text), as Llama runs it."""
    scores, w = z["scores"], int(z["window"])
    n = scores.shape[-1]
    cfg = AdaKVConfig(budget=budget, window=w, **opts)
    alloc = AllocationConfig(budget=budget, window=w, alpha=cfg.alpha, max_ratio=cfg.max_ratio, sinks=cfg.sinks)
    spans = None
    if cfg.spans != "none":
        text = {int(t): str(x).encode() for t, x in zip(z["tokens"], z["pieces"])}
        spans = SpanFinder(text.__getitem__).ids(z["tokens"][:n], cfg.spans)
    return keep_sets(list(scores), n, cfg.method, alloc, kernel=cfg.kernel, pooling=cfg.pooling, spans=spans,
                     span_share=cfg.span_share)


def cmd_span_changes(a: argparse.Namespace) -> int:
    """Which cells a setting keeps instead of another's, summed over the (layer, head) pairs."""
    (base_label, base), (label, opts) = a.settings
    for f in sorted(a.dir.glob("*.npz")):
        z = np.load(f)
        pieces = [str(x) for x in z["pieces"]]
        added: dict[int, int] = {}
        removed: dict[int, int] = {}
        for la, lb in zip(_kept(z, base, a.budget), _kept(z, opts, a.budget)):
            for x, y in zip(la, lb):
                for i in np.setdiff1d(y, x).tolist():
                    added[i] = added.get(i, 0) + 1
                for i in np.setdiff1d(x, y).tolist():
                    removed[i] = removed.get(i, 0) + 1
        heads = sum(len(layer) for layer in z["scores"])
        print(f"{f.stem} @ {a.budget}: {label} keeps {sum(added.values()) / heads:.1f} cells per head that "
              f"{base_label} does not")
        for name, cells in (("kept", added), ("dropped", removed)):
            top = sorted(cells.items(), key=lambda kv: (-kv[1], kv[0]))[: a.top]
            print(f"  most often {name} by {label}: " + "; ".join(
                f"{''.join(pieces[max(0, i - 3):i])}[{pieces[i]}]{''.join(pieces[i + 1:i + 3])}".replace("\n", "\\n")
                + f" x{c}" for i, c in top))
    return 0


def _runs(idx: np.ndarray) -> np.ndarray:
    """Lengths of the maximal runs of consecutive cells in sorted ``idx``."""
    if idx.size == 0:
        return np.zeros(0, dtype=np.int64)
    breaks = np.flatnonzero(np.diff(idx) != 1)
    bounds = np.concatenate([[-1], breaks, [idx.size - 1]])
    return np.diff(bounds)


def profile(f: Path, setting: dict[str, Any], budget: int) -> dict[str, float]:
    z = np.load(f)
    scores, pieces = z["scores"], [str(x) for x in z["pieces"]]
    start, end = (int(x) for x in z["doc_span"])
    w = int(z["window"])
    n = scores.shape[-1]
    kept = _kept(z, setting, budget)
    classes = np.array([_token_class(p) for p in pieces])
    line_of = np.cumsum([0] + ["\n" in p for p in pieces[:-1]])  # line index of every token
    doc_lines = np.unique(line_of[start:end])
    sel_end = n - w
    rows: dict[str, list[float]] = {}

    def add(key: str, v: float) -> None:
        rows.setdefault(key, []).append(v)

    for layer in kept:
        for cells in layer:
            c = cells[cells < sel_end]
            if c.size == 0:
                continue
            runs = _runs(c)
            add("cells", c.size)
            add("runs", runs.size)
            add("mean_run", float(runs.mean()))
            add("share_in_runs_le2", float(runs[runs <= 2].sum() / c.size))
            add("share_in_runs_ge16", float(runs[runs >= 16].sum() / c.size))
            add("share_template", float(np.mean(c < start)))
            add("share_doc_first5", float(np.mean((c >= start) & (c < start + 0.05 * (end - start)))))
            add("share_doc_last5", float(np.mean((c >= end - 0.05 * (end - start)) & (c < end))))
            add("share_instruction", float(np.mean(c >= end)))
            add("share_doc_first50", float(np.mean((c >= start) & (c < start + 0.5 * (end - start)))))
            add("share_doc_last10", float(np.mean((c >= end - 0.1 * (end - start)) & (c < end))))
            for k in ("word", "digit", "markup", "space"):
                add(f"kept_{k}", float(np.mean(classes[c] == k)))
            add("doc_lines_touched", float(np.isin(doc_lines, line_of[c]).mean()))
    out = {k: float(np.mean(v)) for k, v in rows.items()}
    for k in ("word", "digit", "markup", "space"):
        out[f"doc_{k}"] = float(np.mean(classes[start:end] == k))
    # where the window's attention goes (raw scores, before pooling), per layer and head
    s = scores[:, :, :sel_end].astype(np.float64)
    total = s.sum(axis=-1)
    out["attn_template"] = float((s[:, :, :start].sum(-1) / total).mean())
    out["attn_first_cell"] = float((s[:, :, 0] / total).mean())
    out["attn_instruction_before_window"] = float((s[:, :, end:].sum(-1) / total).mean())
    doc = s[:, :, start:end]
    dn = doc.shape[-1]
    doc_total = np.maximum(doc.sum(-1), 1e-30)
    for share, label in ((0.5, "first50"), (0.1, "last10"), (0.01, "last1")):
        part = doc[:, :, : int(share * dn)] if label.startswith("first") else doc[:, :, dn - int(share * dn) :]
        out[f"attn_doc_{label}"] = float((part.sum(-1) / doc_total).mean())
    out["window_cells_in_document"] = float(max(0, min(end, n) - (n - w)))
    top = np.sort(doc, axis=-1)[:, :, ::-1]
    out["attn_doc_top32_of_doc"] = float((top[:, :, :32].sum(-1) / np.maximum(top.sum(-1), 1e-30)).mean())
    return out


def cmd_report(a: argparse.Namespace) -> int:
    files = sorted(a.dir.glob("*.npz"))
    if a.task:
        files = [f for f in files if f.stem.endswith(f"__{a.task}")]
    settings = a.settings or [("default", {})]
    budgets = [int(x) for x in a.budgets.split(",")]
    table: list[dict[str, Any]] = []
    for label, opts in settings:
        for b in budgets:
            per = [profile(f, opts, b) for f in files]
            row = {k: float(np.mean([p[k] for p in per])) for k in per[0]}
            row.update(setting=label, budget=b, prompts=len(files))
            table.append(row)
    keys = [k for k in table[0] if k not in ("setting", "budget", "prompts")]
    print("| measure | " + " | ".join(f"{r['setting']} @ {r['budget']}" for r in table) + " |")
    print("|---|" + "---:|" * len(table))
    for k in keys:
        print(f"| {k} | " + " | ".join(f"{r[k]:.3f}" for r in table) + " |")
    if a.json:
        a.json.write_text(json.dumps({"files": [f.name for f in files], "table": table}, indent=1) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    from instruct_fidelity import parse_setting  # same folder

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("scores")
    s.add_argument("--model", default="smollm2-135m")
    s.add_argument("--documents", default="gpl-2,py-formatstrings,man-tar,etc-services")
    s.add_argument("--tasks", default="summary,question")
    s.add_argument("--questions", type=int, default=1, help="how many of each document's questions")
    s.add_argument("--max-doc-tokens", type=int, default=4000)
    s.add_argument("--min-doc-tokens", type=int, default=3000)
    s.add_argument("--window", type=int, default=32)
    s.add_argument("--gqa", default="mean", help="GQA reduction of the scores (default: mean, as SELECTION.md's "
                   "profiles were made before the default became max)")
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--out", type=Path, required=True)
    r = sub.add_parser("report")
    r.add_argument("dir", type=Path)
    r.add_argument("--task", default="", help="only prompts of this task (summary, question)")
    r.add_argument("--budgets", default="256,512,1024")
    r.add_argument("--setting", dest="settings", action="append", type=parse_setting, default=None)
    r.add_argument("--json", type=Path, default=None)
    t = sub.add_parser("task-scores")
    t.add_argument("--model", default="smollm2-135m")
    t.add_argument("--task", default="passkey")
    t.add_argument("--length", type=int, default=3000)
    t.add_argument("--depths", default="0.5")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--window", type=int, default=32)
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--out", type=Path, required=True)
    k = sub.add_parser("answer-kept")
    k.add_argument("dir", type=Path)
    k.add_argument("--budget", type=int, default=128)
    k.add_argument("--setting", dest="settings", action="append", type=parse_setting, default=None)
    c = sub.add_parser("span-changes")
    c.add_argument("dir", type=Path)
    c.add_argument("--budget", type=int, default=256)
    c.add_argument("--setting", dest="settings", action="append", type=parse_setting, required=True,
                   help="two settings: the base, then the one whose changes are listed")
    c.add_argument("--top", type=int, default=8)
    a = p.parse_args(argv)
    if a.cmd == "span-changes" and len(a.settings) != 2:
        p.error("span-changes takes two --setting")
    return {"scores": cmd_scores, "report": cmd_report, "task-scores": cmd_task_scores,
            "answer-kept": cmd_answer_kept, "span-changes": cmd_span_changes}[a.cmd](a)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
