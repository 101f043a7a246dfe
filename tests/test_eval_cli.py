"""`adakv-local eval fidelity` and `adakv-local bench` on a tiny random model (subprocess, as a user runs them)."""

from __future__ import annotations

import json
import statistics

import pytest
from test_cli_run import cli


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from adakv_local.testing import write_llama_gguf

    return str(write_llama_gguf(tmp_path_factory.mktemp("m") / "t.gguf", n_layer=2, n_embd=256, n_head=4,
                                n_head_kv=2, n_ff=256, seed=31))


def test_eval_fidelity_json(tiny, tmp_path):
    out = tmp_path / "fid.json"
    proc = cli("eval", "fidelity", "--model", tiny, "--methods", "ada-snapkv,snapkv", "--budgets", "48,96",
               "--window", "16", "--n-prompts", "2", "--prompt-tokens", "300", "--continuation", "8",
               "--threads", "1", "--json", str(out), timeout=300)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert len(data["records"]) == 2 * 2 * 2
    for r in data["records"]:
        assert r["kl_mean"] >= 0 and 0 <= r["top1"] <= 1 and r["kl_max"] >= r["kl_mean"]
        assert r["footprint"] < r["prompt_tokens"]
        assert 0 < r["l1_attn"] < 10  # eviction changes the attention outputs, by a bounded amount
    assert {(p["ada"], p["budget"]) for p in data["pairs"]} == {("ada-snapkv", 48), ("ada-snapkv", 96)}
    assert {(p["ada"], p["budget"]) for p in data["pairs_l1_attn"]} == {("ada-snapkv", 48), ("ada-snapkv", 96)}
    assert [r["method"] for r in data["summary_l1_attn"]] == ["ada-snapkv", "ada-snapkv", "snapkv", "snapkv"]
    assert "KL" in proc.stderr and "attention L1" in proc.stderr


def test_eval_fidelity_own_prompts(tiny, tmp_path):
    (tmp_path / "a.txt").write_text("One prompt about boats and the sea, with some words. " * 12)
    proc = cli("eval", "fidelity", "--model", tiny, "--prompts", str(tmp_path), "--methods", "snapkv",
               "--budgets", "40", "--window", "16", "--continuation", "4", "--threads", "1", "--json", "-",
               "--span-share", "inf", "--quiet", timeout=300)
    assert proc.returncode == 0, proc.stderr

    def strict(name: str) -> None:
        raise AssertionError(f"{name} in the JSON")

    data = json.loads(proc.stdout, parse_constant=strict)
    assert data["config"]["prompts"] == [str(tmp_path / "a.txt")]
    assert data["config"]["span_share"] is None  # inf: no limit, written as null
    assert data["config"]["gqa"] == "max"  # the default

    # --gqa reaches the graph's reduction: mean and max score the cells of this GQA model otherwise
    kl = {}
    for gqa in ("mean", "max"):
        proc = cli("eval", "fidelity", "--model", tiny, "--prompts", str(tmp_path), "--methods", "snapkv",
                   "--budgets", "40", "--window", "16", "--continuation", "4", "--threads", "1", "--json", "-",
                   "--gqa", gqa, "--quiet", timeout=300)
        assert proc.returncode == 0, proc.stderr
        data = json.loads(proc.stdout)
        assert data["config"]["gqa"] == gqa
        kl[gqa] = data["records"][0]["kl_mean"]
    assert kl["mean"] != kl["max"]


@pytest.mark.parametrize("args, text", [
    (["--budgets", "8"], "must exceed the window"),
    (["--methods", "h2o"], "unknown method"),
    (["--budgets", "x"], "not a comma-separated list"),
    (["--span-share", "-1"], "must be a number >= 0 (inf: no limit)"),
    (["--gqa", "sum"], "invalid choice: 'sum'"),
])
def test_eval_fidelity_usage_errors(tiny, args, text):
    proc = cli("eval", "fidelity", "--model", tiny, *args)
    assert proc.returncode == 2 and text in proc.stderr and "Traceback" not in proc.stderr


def test_bench_json(tiny, tmp_path):
    proc = cli("bench", "--model", tiny, "--lengths", "200,400", "--budget", "48", "--decode-tokens", "4",
               "--threads", "1", "--json", "-", timeout=300)
    assert proc.returncode == 0, proc.stderr
    recs = json.loads(proc.stdout)["records"]
    assert [r["mode"] for r in recs] == ["full", "ada-snapkv", "full", "ada-snapkv"]
    for full, ev in zip(recs[::2], recs[1::2]):
        assert ev["kv_cells_after"] < full["kv_cells_before"] == full["kv_cells_after"]
        assert ev["kv_bytes_after"] < full["kv_bytes_before"]
        assert ev["decode_speedup"] > 0 and set(ev["seconds"]) == {"scored_ubatch", "allocate", "compact"}


def test_bench_nofa_baseline(tiny):
    proc = cli("bench", "--model", tiny, "--lengths", "200", "--budget", "48", "--decode-tokens", "4",
               "--threads", "1", "--nofa-baseline", "--json", "-", timeout=300)
    assert proc.returncode == 0, proc.stderr
    recs = json.loads(proc.stdout)["records"]
    assert [r["mode"] for r in recs] == ["full-nofa", "full", "ada-snapkv"]
    assert recs[2]["decode_speedup_nofa"] == pytest.approx(recs[2]["decode_tps"] / recs[0]["decode_tps"])
    assert "without flash attention" in proc.stderr


def test_bench_attn_paths(tiny):
    proc = cli("bench", "--model", tiny, "--lengths", "200", "--budget", "48", "--decode-tokens", "4",
               "--threads", "1", "--attn-paths", "auto,mask,heads", "--json", "-", timeout=300)
    assert proc.returncode == 0, proc.stderr
    recs = json.loads(proc.stdout)["records"]
    assert [r["mode"] for r in recs] == ["full", "ada-snapkv", "ada-snapkv[mask]", "ada-snapkv[heads]"]
    assert len({r["kv_cells_after"] for r in recs[1:]}) == 1  # the same selection, only the attention differs
    assert json.loads(proc.stdout)["config"]["attn_paths"] == ["auto", "mask", "heads"]


def test_bench_interleave(tiny):
    """bench --interleave: every mode in a context of its own, the same tokens decoded round after round;
    the medians and ratios are those of the per-round figures written beside them."""
    proc = cli("bench", "--model", tiny, "--interleave", "3", "--lengths", "200", "--budget", "48",
               "--decode-tokens", "4", "--layouts", "pooled,rect", "--attn-paths", "auto,mask", "--threads", "1",
               "--json", "-", timeout=300)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    recs = {r["mode"]: r for r in data["records"]}
    assert list(recs) == ["full", "ada-snapkv", "ada-snapkv[rect]", "ada-snapkv[mask]", "ada-snapkv[mask,rect]"]
    assert data["config"]["interleave"] == 3
    full = recs["full"]
    assert full["kv_cells_after"] == 200 and full["route"] == "stock" and full["budget"] is None
    for r in recs.values():
        rounds = r["decode_tps_rounds"]
        assert len(rounds) == 3 and all(t > 0 for t in rounds), r
        assert r["decode_tps"] == pytest.approx(statistics.median(rounds))
        assert r["decode_speedup"] == pytest.approx(
            statistics.median(a / b for a, b in zip(rounds, full["decode_tps_rounds"])))
    for path, pooled, rect in (("auto", "ada-snapkv", "ada-snapkv[rect]"),
                               ("mask", "ada-snapkv[mask]", "ada-snapkv[mask,rect]")):
        p, q = recs[pooled], recs[rect]
        assert p["attn_path"] == q["attn_path"] == path and (p["layout"], q["layout"]) == ("pooled", "rect")
        assert p["kv_cells_after"] <= q["kv_cells_after"] < 200  # the pooled block is at most the rect one
        assert p["pooled_over_rect"] == pytest.approx(
            statistics.median(a / b for a, b in zip(p["decode_tps_rounds"], q["decode_tps_rounds"])))
        assert "pooled_over_rect" not in q
    # the routes the CPU takes (docs/RESULTS.md, *Decode speed at 8,000 tokens*)
    assert (recs["ada-snapkv[mask]"]["route"], recs["ada-snapkv[mask,rect]"]["route"]) == ("pool-mask", "mask")
    assert "round 3/3" in proc.stderr and "pooled / rect" in proc.stderr


@pytest.mark.parametrize("args, text", [
    (["--repeats", "2", "--nofa-baseline"], "leave out --repeats, --nofa-baseline"),
    (["--n-ctx", "256"], "leave out --n-ctx"),
])
def test_bench_interleave_usage_errors(tiny, args, text):
    proc = cli("bench", "--model", tiny, "--interleave", "2", "--lengths", "200", "--budget", "48", *args)
    assert proc.returncode == 2 and text in proc.stderr and "Traceback" not in proc.stderr


def test_plots_are_written(tmp_path):
    pytest.importorskip("matplotlib", reason="plots need the plot extra (matplotlib)")
    from adakv_local.eval.bench import plot_bench
    from adakv_local.eval.evaluate import plot_fidelity

    recs = [{"prompt": p, "method": m, "budget": b, "kl_mean": k * (1 + p), "kl_max": 1.0, "top1": 0.9,
             "l1_attn": k / 2}
            for p in (0, 1) for m, k in (("ada-snapkv", 0.1), ("snapkv", 0.2)) for b in (64, 128)]
    plot_fidelity(recs, tmp_path / "f.png", "test")
    bench = [{"mode": mode, "prompt_tokens": n, "decode_tps": tps, "budget": 64}
             for mode, tps in (("full", 10.0), ("ada-snapkv", 30.0)) for n in (1000, 2000)]
    plot_bench(bench, tmp_path / "b.png", "test")
    for f in ("f.png", "b.png"):
        assert (tmp_path / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_tasks_json(tiny):
    proc = cli("eval", "tasks", "--model", tiny, "--tasks", "passkey,vartrack", "--lengths", "700",
               "--depths", "0.5", "--methods", "ada-snapkv", "--budgets", "64", "--threads", "1", "--json", "-",
               timeout=300)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert {(r["task"], r["method"]) for r in data["records"]} == {
        ("passkey", "full"), ("passkey", "ada-snapkv"), ("vartrack", "full"), ("vartrack", "ada-snapkv")}
    assert all(0 <= r["accuracy"] <= 1 for r in data["summary"])
    bad = cli("eval", "tasks", "--model", tiny, "--tasks", "sudoku")
    assert bad.returncode == 2 and "unknown task" in bad.stderr
    short = cli("eval", "tasks", "--model", tiny, "--tasks", "vartrack", "--lengths", "50", "--threads", "1")
    assert short.returncode == 2 and "too short" in short.stderr and "Traceback" not in short.stderr


def test_bench_memory_counts_sliding_window_layers_in_full(tiny_gemma3):
    """Bytes come from the native memory figures: AdaKVStats with eviction, kvcache.context_memory for
    the full-cache runs."""
    from adakv_local.eval.bench import kv_bytes_without_eviction, run_one
    from adakv_local.inspection import model_n_layer
    from adakv_local.llama import Llama

    path = str(tiny_gemma3)
    llm = Llama(model_path=path, n_ctx=512, adakv_budget=48, adakv_window=16, verbose=False)
    n_layer, n_evicted = model_n_layer(llm.model), llm.adakv_kvcache.n_layer
    mem = llm.adakv_kvcache.memory()
    toks = llm.tokenize(b"Some words about boats and the sea. " * 8)
    assert kv_bytes_without_eviction(llm, len(toks)) == len(toks) * (mem.cell_bytes + mem.swa_cell_bytes)
    llm.close()
    assert 0 < n_evicted < n_layer  # iSWA: the sliding-window layers are not evicted
    rec = run_one(path, toks, 2, budget=48, method="snapkv", n_threads=1, window=16)
    assert rec.kv_cells_after < len(toks) < mem.swa_cells
    assert rec.kv_bytes_before == len(toks) * (mem.cell_bytes + mem.swa_cell_bytes)
    # the evicted layers hold their cells, the sliding-window ring (512 cells here) every token
    assert rec.kv_bytes_after == rec.kv_cells_after * mem.cell_bytes + len(toks) * mem.swa_cell_bytes


@pytest.mark.parametrize("cache_type, row_bytes", [(1, 2 * 64), (8, 34 * 2), (2, 18 * 2)])  # f16, q8_0, q4_0
def test_bench_full_cache_bytes_follow_the_cache_type(tiny64, cache_type, row_bytes):
    """A context without eviction gets its bytes from the same native figures as one with eviction:
    3 layers x 2 KV heads x (K + V) rows of 64 values (f16: 2 bytes each; q8_0 / q4_0: blocks of 32 in
    34 / 18 bytes)."""
    from adakv_local.eval.bench import kv_bytes_without_eviction
    from adakv_local.llama import Llama

    kw = dict(model_path=str(tiny64), n_ctx=256, type_k=cache_type, type_v=cache_type, flash_attn=True, verbose=False)
    full, evicted = Llama(**kw), Llama(**kw, adakv_budget=48, adakv_window=16)
    try:
        assert full.adakv_kvcache is None
        mem = evicted.adakv_kvcache.memory()
        assert mem.cell_bytes == 3 * 2 * 2 * row_bytes
        assert kv_bytes_without_eviction(full, 100) == kv_bytes_without_eviction(evicted, 100) == 100 * mem.cell_bytes
    finally:
        full.close()
        evicted.close()


def test_bench_direct_overhead_times_the_last_ubatch(tiny_llama):
    """bench --direct: the last ubatch from one saved state, plain and with eviction, alternately."""
    from adakv_local.eval.bench import last_ubatch_extra
    from adakv_local.llama import Llama

    vocab = Llama(model_path=str(tiny_llama), vocab_only=True, verbose=False)
    toks = vocab.tokenize(b"Some words about boats and the sea. " * 40)
    vocab.close()
    d = last_ubatch_extra(str(tiny_llama), toks, budget=64, method="ada-snapkv", n_threads=1, window=16, repeats=2)
    assert d["last_ubatch_tokens"] == 512 < len(toks) and d["last_ubatch_seconds"] > 0
    assert set(d) == {"extra_seconds", "extra_cpu_seconds", "last_ubatch_tokens", "last_ubatch_seconds"}


def test_eval_fidelity_instructions(tiny, tmp_path):
    """--instructions: installed documents (Python's own, present wherever adakv-local runs), a summary
    and a question each, the full cache's answer teacher-forced after every (method, budget)."""
    out = tmp_path / "answers.json"
    proc = cli("eval", "fidelity", "--model", tiny, "--instructions", "--documents", "python-license,py-debugger",
               "--methods", "ada-snapkv,snapkv", "--budgets", "48", "--window", "16", "--prompt-tokens", "300",
               "--continuation", "4", "--threads", "1", "--questions", "2", "--json", str(out), timeout=300)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert data["config"]["mode"] == "chat" and set(data["config"]["documents"]) == {"python-license", "py-debugger"}
    assert data["config"]["questions"] == 2
    recs = data["records"]
    assert len(recs) == 2 * 3 * 2  # documents x (summary, 2 questions) x methods
    assert {(r["prompt"], r["task"], r["setting"]) for r in recs} == {
        (f"{d}/{p}", p.split("-")[0], m) for d in ("python-license", "py-debugger")
        for p in ("summary", "question", "question-2") for m in ("ada-snapkv", "snapkv")}
    for r in recs:
        assert r["kl_mean"] >= 0 and 0 <= r["top1"] <= 1 and 2 <= r["answer_tokens"] <= 4
    assert {(q["task"], q["budget"]) for q in data["pairs"]} == {("summary", 48), ("question", 48)}
    assert "instruction fidelity (chat)" in proc.stderr


@pytest.mark.parametrize("args, text", [
    (["--instructions", "--documents", "no-such-doc"], "unknown name"),
    (["--documents", "gpl-2"], "--documents needs --instructions"),
    (["--questions", "2"], "--questions needs --instructions"),
    (["--instructions", "--questions", "0"], "--questions"),
    (["--instructions", "--prompts", "."], "choose one"),
])
def test_eval_fidelity_instructions_usage_errors(tiny, args, text):
    proc = cli("eval", "fidelity", "--model", tiny, *args)
    assert proc.returncode == 2 and text in proc.stderr and "Traceback" not in proc.stderr
