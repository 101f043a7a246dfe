"""``adakv-local eval fidelity``: how close each method's compressed cache stays to the full cache.

For every prompt the prefix before the observation window is evaluated once and saved; then,
for the full cache and for every (method, budget), the state is restored, the window is
evaluated (and the cache compressed), and a fixed continuation is teacher-forced. All runs
therefore share the same batches and kernels: the differences come from the eviction only.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..llama import Llama
from .fidelity import attention_l1, compare
from .texts import documents


def builtin_prompts(llm: Any, n_prompts: int, n_tokens: int) -> list[tuple[str, list[int]]]:
    """n_prompts prompts of n_tokens tokens from the standard library's documentation.

    First the opening n_tokens of every module that has them (``stdlib:NAME``), then, while
    more are asked for, every module's next n_tokens (``stdlib:NAME#2``, ``#3``, ...; the BOS
    token, if the model adds one, starts these too). Fewer come back if the texts run out.
    """
    bos = llm.tokenize(b"")  # [BOS] or []
    bodies = []
    for name, text in documents(min_chars=n_tokens * 3):
        toks = llm.tokenize(text.encode())
        bodies.append((name, toks[len(bos) :]))
    step = n_tokens - len(bos)
    out: list[tuple[str, list[int]]] = []
    for k in range(max((len(b) // step for _, b in bodies), default=0)):
        for name, body in bodies:
            piece = body[k * step : (k + 1) * step]
            if len(piece) == step and len(out) < n_prompts:
                out.append((f"stdlib:{name}" + (f"#{k + 1}" if k else ""), bos + piece))
    if not out:
        raise ValueError(f"no built-in prompt reaches {n_tokens} tokens; lower --prompt-tokens")
    return out


def file_prompts(llm: Any, path: Path, n_tokens: int | None) -> list[tuple[str, list[int]]]:
    """One prompt per file: a file, or every *.txt / *.md file of a folder (sorted)."""
    files = sorted(p for p in path.iterdir() if p.suffix in (".txt", ".md")) if path.is_dir() else [path]
    if not files:
        raise ValueError(f"{path}: no .txt or .md files")
    out = []
    for f in files:
        toks = llm.tokenize(f.read_text(errors="replace").encode())
        out.append((str(f), toks[:n_tokens] if n_tokens else toks))
    return out


def _mean_ci(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% normal confidence interval."""
    a = np.asarray(xs, dtype=np.float64)
    if len(a) < 2:
        return float(a.mean()), float("nan")
    return float(a.mean()), float(1.96 * a.std(ddof=1) / math.sqrt(len(a)))


def check_window_option(options: dict[str, Any], window: int, where: str) -> None:
    """A window in a run's options may not exceed the run's own: the state is saved before the run's
    last ``window`` prompt tokens, and a larger window would leave the prompt uncompressed."""
    if not 1 <= options.get("window", window) <= window:
        raise ValueError(f"{where}: window must be in [1, {window}] (the run's window: the state is saved before "
                         "the run's last window tokens)")


def continue_from(llm: Any, prefix_state: Any, window_tokens: list[int], config: Any) -> np.ndarray:
    """Restore the prefix, evaluate the window under config (None: full cache); the last logits."""
    llm.load_state(prefix_state)
    llm.adakv_config = config
    llm.eval(window_tokens)
    return np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)


def teacher_force(llm: Any, tokens: list[int]) -> np.ndarray:
    """Evaluate tokens (one ubatch, not compressed) and capture every evicted layer's attention
    outputs for them: [n_layer, len(tokens), width]."""
    kv = llm.adakv_kvcache
    kv.arm_capture(len(tokens))
    try:
        with llm.adakv_suspended():
            llm.eval(tokens)
        return kv.read_capture(len(tokens))
    finally:
        kv.arm_capture(0)


def run_fidelity(
    model_path: str,
    prompts: Sequence[tuple[str, list[int]]],
    methods: Sequence[str],
    budgets: Sequence[int],
    *,
    window: int = 32,
    kernel: int = 7,
    n_continuation: int = 64,
    n_threads: int = 2,
    n_gpu_layers: int = 0,
    progress: Callable[[int, int, str], None] | None = None,
    options: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Records {prompt, method, budget, kl_mean, kl_max, top1, l1_attn, prompt_tokens, footprint, kv_bytes}:
    footprint is the cells the cache holds after the prompt: R, the cells of the compacted block,
    or the whole prompt where the budget left nothing to evict; kv_bytes the K and V bytes they hold.

    ``options``: more eviction options for every run (AdaKVConfig names, e.g. ``{"pooling": "max2"}``).

    ``l1_attn`` (:func:`~adakv_local.eval.fidelity.attention_l1`) compares the attention outputs of
    every evicted layer on the teacher-forced continuation with the full cache's.
    """
    if not 2 <= n_continuation <= 513:
        raise ValueError(f"n_continuation must be in [2, 513] (the continuation is teacher-forced in one "
                         f"512-token ubatch), got {n_continuation}")
    check_window_option(options or {}, window, "options")
    longest = max(len(t) for _, t in prompts)
    n_ctx = ((longest + n_continuation + 64) // 256 + 1) * 256
    llm = Llama(model_path=model_path, n_ctx=n_ctx, n_batch=512, n_threads=n_threads, n_threads_batch=n_threads,
                n_gpu_layers=n_gpu_layers, logits_all=True, adakv_budget=max(window, min(budgets)),
                adakv_window=window, adakv_kernel=kernel, adakv_gqa=(options or {}).get("gqa"), verbose=False)
    base = llm.adakv_config
    assert base is not None
    base = dataclasses.replace(base, **(options or {}))
    total = len(prompts) * (1 + len(methods) * len(budgets))
    done = 0
    records: list[dict[str, Any]] = []
    try:
        for name, toks in prompts:
            if len(toks) <= window:
                raise ValueError(f"prompt {name} has {len(toks)} tokens, not more than the window ({window})")
            llm.reset()
            with llm.adakv_suspended():
                llm.eval(toks[:-window])
            prefix_state = llm.save_state()

            # the full cache: its greedy continuation is the one every method is forced along
            last = continue_from(llm, prefix_state, toks[-window:], None)
            cont: list[int] = []
            for _ in range(n_continuation):
                cont.append(int(last.argmax()))
                llm.eval([cont[-1]])
                last = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
            full = np.array(llm.scores[len(toks) - 1 : len(toks) - 1 + n_continuation], dtype=np.float32)
            continue_from(llm, prefix_state, toks[-window:], None)
            full_attn = teacher_force(llm, cont[:-1])
            done += 1
            if progress:
                progress(done, total, f"{name}: full cache")

            for method in methods:
                for budget in budgets:
                    cfg = dataclasses.replace(base, method=method, budget=budget)
                    continue_from(llm, prefix_state, toks[-window:], cfg)
                    st = llm.adakv_stats  # this evaluation's record, compressed or not
                    assert st is not None and st.prompt_tokens == len(toks)
                    footprint, kv_bytes = st.cells_after, st.kv_bytes
                    got_attn = teacher_force(llm, cont[:-1])
                    got = np.array(llm.scores[len(toks) - 1 : len(toks) - 1 + n_continuation], dtype=np.float32)
                    f = compare(full, got)
                    records.append({
                        "prompt": name, "method": method, "budget": budget, "prompt_tokens": len(toks),
                        "kl_mean": f.kl_mean, "kl_max": f.kl_max, "top1": f.top1,
                        "l1_attn": attention_l1(full_attn, got_attn), "footprint": footprint, "kv_bytes": kv_bytes,
                    })  # fmt: skip
                    done += 1
                    if progress:
                        progress(done, total, f"{name}: {method} @ {budget}: KL {f.kl_mean:.4f}")
    finally:
        llm.close()
    return records


def summarize(records: Iterable[dict[str, Any]], key: str = "kl_mean") -> list[dict[str, Any]]:
    """Mean and 95% CI of a metric per (method, budget), plus Ada-vs-baseline wins on shared prompts."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["method"], r["budget"]), []).append(r)
    out = []
    for (method, budget), rs in sorted(groups.items()):
        mean, ci = _mean_ci([r[key] for r in rs])
        row = {"method": method, "budget": budget, "n": len(rs), key: mean, f"{key}_ci95": ci,
               "top1": float(np.mean([r["top1"] for r in rs]))}
        if all("footprint" in r for r in rs):  # what the figure costs: R and the K/V bytes held
            row["footprint"] = float(np.mean([r["footprint"] for r in rs]))
        if all(r.get("kv_bytes") is not None for r in rs):
            row["kv_bytes"] = float(np.mean([r["kv_bytes"] for r in rs]))
        out.append(row)
    return out


PAIRS = (("ada-snapkv", "snapkv"), ("ada-pyramid", "pyramidkv"))


def compare_pairs(records: Iterable[dict[str, Any]], key: str = "kl_mean") -> list[dict[str, Any]]:
    """Per budget: how often and by how much each Ada method beats its baseline on the same prompts."""
    by = {(r["method"], r["budget"], r["prompt"]): r[key] for r in records}
    out = []
    for ada, base in PAIRS:
        budgets = sorted({b for (m, b, _) in by if m == ada})
        for b in budgets:
            prompts = [p for (m, bb, p) in by if m == ada and bb == b and (base, b, p) in by]
            if not prompts:
                continue
            a = np.array([by[(ada, b, p)] for p in prompts])
            s = np.array([by[(base, b, p)] for p in prompts])
            out.append({"ada": ada, "baseline": base, "budget": b, "n": len(prompts),
                        "ada_mean": float(a.mean()), "baseline_mean": float(s.mean()),
                        "ada_wins": int((a < s).sum()), "ratio": float(a.mean() / s.mean()) if s.mean() > 0 else 1.0})
    return out


def plot_fidelity(records: Sequence[dict[str, Any]], out: Path, title: str) -> None:
    """KL and, where recorded, attention L1 (means with 95% CIs) against budget, one line per method."""
    plt = pyplot()
    keys = [("kl_mean", "mean KL(full || compressed)")]
    if all("l1_attn" in r for r in records):
        keys.append(("l1_attn", "attention-output L1 (relative)"))
    fig, axes = plt.subplots(1, len(keys), figsize=(6.4 * len(keys), 4.2), dpi=120, squeeze=False)
    for ax, (key, label) in zip(axes[0], keys):
        rows = summarize(records, key)
        for method in sorted({r["method"] for r in rows}):
            rs = [r for r in rows if r["method"] == method]
            ci = [0.0 if math.isnan(r[f"{key}_ci95"]) else r[f"{key}_ci95"] for r in rs]
            ax.errorbar([r["budget"] for r in rs], [r[key] for r in rs], yerr=ci, marker="o", capsize=3, label=method)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("budget (cells per KV head)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def pyplot() -> Any:
    """matplotlib.pyplot with the Agg backend (files only), or RuntimeError naming the extra to install."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("plots need matplotlib: pip install 'adakv-local[plot]'") from None
    return plt


def plot_tasks(summary: Sequence[dict[str, Any]], out: Path, title: str) -> None:
    """Accuracy against budget, one line per method; the full cache as a dashed line per task."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for task in sorted({r["task"] for r in summary}):
        rows = [r for r in summary if r["task"] == task]
        full = [r["accuracy"] for r in rows if r["budget"] is None]
        if full:
            ax.axhline(float(np.mean(full)), linestyle="--", color="gray", label=f"{task}: full cache")
        for method in sorted({r["method"] for r in rows if r["budget"] is not None}):
            rs = sorted((r for r in rows if r["method"] == method), key=lambda r: r["budget"])
            ax.plot([r["budget"] for r in rs], [r["accuracy"] for r in rs], marker="o", label=f"{task}: {method}")
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("budget (cells per KV head)")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
