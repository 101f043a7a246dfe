"""`adakv-local summarize` and `adakv-local chat`, run as a subprocess as a user would.

The CLI is the installed `adakv-local` script when there is one on PATH (CI), else
`python -m adakv_local` from the current directory with the inherited environment (a source
tree with ADAKV_LIB_DIR). Most tests use a tiny random model (one token per character, never
EOS); those marked slow use SmolLM2-135M. Everything runs with --threads 1: on a busy 2-core
machine, spinning ggml threads slow decoding down a hundredfold.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ada-kv.md"

# ~700 characters: about 760 prompt tokens for the tiny model, far above --budget 64
DOC = (
    "The harbour town woke early. Fishing boats left before dawn, and by the time the bakery opened "
    "the first crates of herring were already on the quay. Tourists arrived later, with cameras and "
    "questions about the old lighthouse, which had not been lit for forty years. The council wanted "
    "to turn it into a museum; the fishermen wanted it repaired and working again, because fog "
    "still rolled in every autumn and the new electronic buoys failed more often than anyone liked "
    "to admit. After three public meetings the two sides agreed on a compromise: the lamp would be "
    "restored and kept for emergencies, and the lower floor would host a small exhibition about the "
    "keepers who had lived there, their logbooks, and the storms they had recorded."
)
EVICT = ["--budget", "64", "--window", "16", "--threads", "1"]


def _cmd() -> list[str]:
    exe = shutil.which("adakv-local")
    return [exe] if exe else [sys.executable, "-m", "adakv_local"]


def cli(*args: str, input: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*_cmd(), *args], input=input, capture_output=True, text=True, timeout=timeout)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert re.match(r"adakv-local( [a-z]+)*: error: ", lines[0]), lines[0]
    return lines[0]


def native_cell_bytes(model: Path) -> int:
    """K and V bytes of one cache cell of model, as the native library reports them."""
    from adakv_local.llama import Llama

    llm = Llama(model_path=str(model), n_ctx=256, n_threads=1, adakv_budget=64, adakv_window=16, verbose=False)
    try:
        return llm.adakv_kvcache.memory().cell_bytes
    finally:
        llm.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from adakv_local.testing import write_llama_gguf

    return write_llama_gguf(tmp_path_factory.mktemp("cli") / "tiny.gguf", n_embd=256, n_head=4, n_head_kv=2,
                            n_ff=256, seed=5)


@pytest.fixture(scope="module")
def doc(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("docs") / "harbour.md"
    path.write_text(f"# The lighthouse\n\n{DOC}\n")
    return path


def test_help_has_examples():
    for command in ("summarize", "chat"):
        proc = cli(command, "--help")
        assert proc.returncode == 0, proc.stderr
        assert "examples:" in proc.stdout and "--budget" in proc.stdout and "--max-tokens" in proc.stdout
    top = cli("--help")
    assert "summarize" in top.stdout and "chat" in top.stdout and "models" in top.stdout


def test_summarize_json_reports_a_compressed_cache(tiny, doc):
    proc = cli("summarize", str(doc), "--model", str(tiny), "--max-tokens", "12", "--json", *EVICT)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)  # one JSON object, nothing else on stdout
    assert isinstance(out["summary"], str)
    s = out["stats"]
    assert s["compressed"] is True and s["method"] == "ada-snapkv" and s["budget"] == 64
    assert s["prompt_tokens"] == s["kv_cells_before"] > 700
    assert 64 <= s["kv_cells_after"] < s["kv_cells_before"]
    assert s["kv_cells_kept_mean"] == pytest.approx(64, abs=1)
    assert 0 < s["kv_bytes_after"] < s["kv_bytes_before"]
    # the native memory figures of the same model (K and V bytes per cell, whatever the cache type)
    assert s["kv_bytes_before"] == s["kv_cells_before"] * native_cell_bytes(tiny)
    assert s["completion_tokens"] == 12
    assert s["prefill_tps"] > 0 and s["decode_tps"] > 0
    assert set(s["seconds"]) == {"scored_ubatch", "allocate", "compact"}
    assert s["n_ctx"] % 256 == 0 and s["n_ctx"] >= s["prompt_tokens"] + 12
    assert "reading the document" in proc.stderr  # progress goes to stderr, plain lines off a TTY


def test_summarize_streams_stdin_with_stats_on_stderr(tiny):
    proc = cli("summarize", "--model", str(tiny), "--max-tokens", "8", *EVICT, input=DOC)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.endswith("\n") and len(proc.stdout.strip()) <= 8 * 4
    assert "Traceback" not in proc.stderr
    progress = [ln for ln in proc.stderr.splitlines() if "reading the document" in ln]
    assert 1 <= len(progress) <= 5 and "\r" not in proc.stderr
    assert "tok/s" in progress[-1] and "/" in progress[-1]
    assert "KV cache:" in proc.stderr and "eviction: allocate" in proc.stderr and "prompt reading" in proc.stderr


def test_summarize_quiet_and_short_prompt_within_budget(tiny, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("A short note.")
    proc = cli("summarize", str(short), "--model", str(tiny), "--max-tokens", "4", "--json", "--quiet",
               "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    s = json.loads(proc.stdout)["stats"]
    assert s["compressed"] is False and s["kv_cells_after"] == s["kv_cells_before"] == s["prompt_tokens"]


def test_a_budget_above_the_prompt_says_so(tiny, doc):
    proc = cli("summarize", str(doc), "--model", str(tiny), "--max-tokens", "2", "--budget", "1e9", "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    assert "the budget (1000000000 cells per head) exceeds the " in proc.stderr and "nothing is evicted" in proc.stderr
    assert "within the budget" not in proc.stderr
    proc = cli("chat", "--model", str(tiny), "--max-tokens", "2", "--budget", "1e9", "--threads", "1", "--lines",
               input=f"{DOC}\n/stats\n")
    assert proc.returncode == 0, proc.stderr
    assert "last turn: not compressed: the budget (1000000000 cells per head) exceeds the " in proc.stdout


@pytest.mark.parametrize("args, option", [
    (["--budget", "-5"], "--budget"),
    (["--budget", "8"], "--budget"),  # below the window
    (["--method", "nope"], "--method"),
    (["--alpha", "1.5"], "--alpha"),
    (["--max-tokens", "0"], "--max-tokens"),
])
def test_bad_option_values_are_usage_errors(tiny, doc, args, option):
    proc = cli("summarize", str(doc), "--model", str(tiny), *args)
    assert proc.returncode == 2
    if option == "--max-tokens":  # argparse's own check: usage, then the error line
        assert "Traceback" not in proc.stderr and f"argument {option}" in proc.stderr.splitlines()[-1]
    else:
        assert option in one_line_error(proc)


def test_missing_file_and_unknown_model(tiny, doc, tmp_path):
    proc = cli("summarize", str(tmp_path / "nope.md"), "--model", str(tiny))
    assert proc.returncode == 1
    assert "nope.md" in one_line_error(proc)
    proc = cli("summarize", "-", "--model", "no-such-model", input=DOC)
    assert proc.returncode == 2
    assert "--model" in one_line_error(proc) and "smollm2-135m" in proc.stderr
    proc = cli("summarize", str(doc), "--model", str(tmp_path / "nope.gguf"))
    assert proc.returncode == 2  # neither a file nor a known name
    assert "nope.gguf" in one_line_error(proc)
    proc = cli("chat", "--model", "no-such-model", input="/exit\n")
    assert proc.returncode == 2
    one_line_error(proc)


def test_model_that_does_not_load_is_a_runtime_failure(doc, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file")
    proc = cli("summarize", str(doc), "--model", str(bad))
    assert proc.returncode == 1
    assert "cannot load model" in one_line_error(proc)


def test_too_long_document_advice_fits_the_case(tiny, doc, tmp_path):
    # without eviction (--method full) the prompt alone (~760 tokens) exceeds --n-ctx: a smaller
    # --max-tokens cannot help, a larger --n-ctx or eviction (chunked reading) can
    proc = cli("summarize", str(doc), "--model", str(tiny), "--n-ctx", "512", "--max-tokens", "8", "--method", "full")
    assert proc.returncode == 1
    line = one_line_error(proc)
    assert "too long" in line and "prompt alone" in line and "split" in line and "drop --method full" in line
    assert "raise --n-ctx to at least" in line and "--max-tokens" not in line
    # the prompt fits, prompt + summary does not: the longest summary that fits, or a larger --n-ctx
    prompt = json.loads(cli("summarize", str(doc), "--model", str(tiny), "--max-tokens", "1", "--json", "--quiet",
                            "--threads", "1").stdout)["stats"]["prompt_tokens"]
    n_ctx = prompt + 50
    proc = cli("summarize", str(doc), "--model", str(tiny), "--n-ctx", str(n_ctx), "--max-tokens", "100",
               "--method", "full")
    assert proc.returncode == 1
    line = one_line_error(proc)
    assert f"--max-tokens {n_ctx - prompt - 1} or less" in line and f"--n-ctx {prompt + 101}" in line, line
    # the prompt alone exceeds the trained context: only a shorter document helps
    huge = tmp_path / "huge.txt"
    huge.write_text(DOC * 7)  # ~5000 tokens, the tiny model was trained for 4096
    proc = cli("summarize", str(huge), "--model", str(tiny))
    assert proc.returncode == 1
    line = one_line_error(proc)
    assert "too long" in line and "4096" in line and "shorten" in line
    assert "--max-tokens" not in line and "--n-ctx" not in line
    proc = cli("summarize", str(huge), "--model", str(tiny), "--n-ctx", "4096")
    line = one_line_error(proc)
    assert proc.returncode == 1 and "4096-token context the model was trained for" in line
    assert "raise --n-ctx" not in line
    proc = cli("summarize", str(huge), "--model", str(tiny), "--n-ctx", "4096", "--method", "full")
    line = one_line_error(proc)
    assert proc.returncode == 1 and "trained for 4096" in line and "raise --n-ctx" not in line


def test_document_longer_than_the_cache_is_read_in_chunks(tiny, doc):
    """With eviction, --n-ctx below the prompt reads it in chunks; too small a cache for the budget says so."""
    proc = cli("summarize", str(doc), "--model", str(tiny), "--n-ctx", "512", "--max-tokens", "8", "--budget", "480")
    assert proc.returncode == 2
    line = one_line_error(proc)
    assert "--n-ctx = 512 is too small" in line and "budget 480" in line and "--n-ctx >= " in line, line
    proc = cli("summarize", str(doc), "--model", str(tiny), "--n-ctx", "512", "--max-tokens", "8", "--budget", "64",
               "--chunk", "200", "--json", "--quiet", *EVICT)
    assert proc.returncode == 0, proc.stderr
    s = json.loads(proc.stdout)["stats"]
    assert s["n_ctx"] == 512 < s["prompt_tokens"] and s["compressed"]
    assert s["chunks"] >= 4 and 2 <= s["compressions"] <= s["chunks"] and s["peak_cells"] <= 512
    assert 0 < s["kv_bytes_peak"] <= s["kv_bytes_allocated"] and s["footprint"] == s["kv_cells_after"]
    proc = cli("summarize", str(doc), "--model", str(tiny), "--n-ctx", "512", "--max-tokens", "4", "--budget", "64",
               *EVICT)
    assert proc.returncode == 0 and "chunks" in proc.stderr and "compressions" in proc.stderr, proc.stderr


@pytest.mark.parametrize("prompt, max_tokens, n_ctx, allow, says, not_says", [
    (885, 4, 512, False, "prompt alone is 885 tokens; raise --n-ctx to at least 890, or split", "--max-tokens"),
    (4000, 200, 2048, False, "raise --n-ctx to 4096 (the model's trained context) with --max-tokens 95 or less", ""),
    (4000, 200, 2048, True, "raise --n-ctx to at least 4201", "trained"),
    (4100, 4, 2048, False, "(the model was trained for 4096): its prompt alone is 4100 tokens; shorten", "raise"),
    (885, 100, 900, False, "= 985; use --max-tokens 14 or less, or --n-ctx 986", "split"),
    (4000, 200, 4096, False, "use --max-tokens 95 or less", ", or --n-ctx"),
    (4000, 200, None, False, "4096-token context the model was trained for: the prompt is 4000 tokens", "--n-ctx"),
    (5000, 4, None, False, "its prompt alone is 5000 tokens; shorten or split", "--max-tokens"),
])
def test_too_long_advice_by_case(prompt, max_tokens, n_ctx, allow, says, not_says):
    from adakv_local.cli.errors import CLIError
    from adakv_local.cli.summarize import choose_n_ctx

    with pytest.raises(CLIError) as e:
        choose_n_ctx(prompt, max_tokens, 4096, n_ctx, allow)
    assert says in str(e.value) and (not not_says or not_says not in str(e.value)), str(e.value)


def test_n_ctx_choice_when_it_fits():
    from adakv_local.cli.summarize import choose_n_ctx

    assert choose_n_ctx(885, 100, 4096, None) == 1024  # prompt + max tokens + a margin, rounded up to 256
    assert choose_n_ctx(3900, 150, 4096, None) == 4096  # rounded up, then capped at the trained context
    assert choose_n_ctx(885, 100, 4096, 4096) == 4096
    assert choose_n_ctx(5000, 4, 4096, None, allow_overflow=True) == 5120


def test_method_full_reports_no_compression(tiny, doc):
    proc = cli("summarize", str(doc), "--model", str(tiny), "--max-tokens", "4", "--method", "full", "--json",
               *EVICT)
    assert proc.returncode == 0, proc.stderr
    s = json.loads(proc.stdout)["stats"]
    assert s["compressed"] is False and s["method"] == "full" and s["budget"] is None
    assert s["kv_cells_after"] == s["kv_cells_before"] == s["prompt_tokens"] > 700
    assert s["seconds"] == {"scored_ubatch": 0.0, "allocate": 0.0, "compact": 0.0}
    proc = cli("summarize", str(doc), "--model", str(tiny), "--max-tokens", "4", "--method", "full", *EVICT)
    assert proc.returncode == 0, proc.stderr
    assert "eviction:" not in proc.stderr and "budget" not in proc.stderr
    assert "full cache, nothing evicted" in proc.stderr
    proc = cli("chat", "--lines", "--model", str(tiny), "--max-tokens", "4", "--method", "full", *EVICT,
               input=f"{DOC}\n/stats\n")
    assert proc.returncode == 0, proc.stderr
    assert "nothing is evicted" in proc.stdout and "last eviction" not in proc.stdout and "budget" not in proc.stdout


def test_n_ctx_above_the_trained_context_is_refused(tiny, doc):
    for command, stdin in (["summarize", str(doc)], None), (["chat"], "/exit\n"):
        proc = cli(*command, "--model", str(tiny), "--n-ctx", "100000", "--threads", "1", input=stdin)
        assert proc.returncode == 2, (command, proc.stderr)
        line = one_line_error(proc)
        assert "--n-ctx 100000" in line and "4096" in line and "--allow-context-overflow" in line, line
    proc = cli("summarize", str(doc), "--model", str(tiny), "--n-ctx", "4352", "--allow-context-overflow",
               "--max-tokens", "2", "--json", "--quiet", "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["stats"]["n_ctx"] == 4352


def test_documents_that_are_not_text_are_refused(tiny, tmp_path):
    cases = {
        "elf.bin": b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 8,  # NUL bytes
        "latin1.txt": "Caf\u00e9 au lait, cr\u00e8me br\u00fbl\u00e9e. ".encode("latin-1") * 20,
        "controls.txt": bytes(range(1, 9)) * 40 + b"some words",
        "utf16.txt": "A note in UTF-16.".encode("utf-16"),
    }
    reasons = {"elf.bin": "NUL bytes", "latin1.txt": "not UTF-8 text (byte 0xe9", "controls.txt": "control characters",
               "utf16.txt": "UTF-16"}
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        proc = cli("summarize", str(path), "--model", str(tiny))
        assert proc.returncode == 1, (name, proc.stderr)
        line = one_line_error(proc)
        assert str(path) in line and reasons[name] in line, line
    proc = subprocess.run([*_cmd(), "summarize", "--model", str(tiny)], input=cases["elf.bin"], capture_output=True,
                          timeout=120)
    assert proc.returncode == 1 and b"stdin is not text" in proc.stderr and b"Traceback" not in proc.stderr


def test_broken_model_files_say_what_is_wrong(tiny, doc, tmp_path):
    data = tiny.read_bytes()
    cases = {"cut.gguf": (data[: len(data) // 2], "truncated: tensor"),
             "magic.gguf": (b"GGML" + data[4:], "not a GGUF file (no 'GGUF' magic)"),
             "empty.gguf": (b"", "is empty")}
    for name, (content, reason) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        for command in ("summarize", "chat"):
            proc = cli(command, *([str(doc)] if command == "summarize" else []), "--model", str(path), input="")
            assert proc.returncode == 1, (name, command, proc.stderr)
            line = one_line_error(proc)
            assert f"cannot load model {path}: " in line and reason in line, line


def test_verbose_lets_llama_cpp_say_why_a_model_does_not_load(doc, tmp_path):
    from adakv_local.testing import write_unknown_arch_gguf

    path = write_unknown_arch_gguf(tmp_path / "unknown-arch.gguf")  # a complete GGUF file that llama.cpp refuses
    proc = cli("summarize", str(doc), "--model", str(path))
    assert proc.returncode == 1
    assert "cannot load model" in one_line_error(proc) and "--verbose" in proc.stderr
    proc = cli("summarize", str(doc), "--model", str(path), "--verbose")
    assert proc.returncode == 1 and "unknown model architecture: 'no-such-arch'" in proc.stderr


def test_budget_range_in_help_and_errors(tiny, doc):
    help_text = " ".join(cli("summarize", "--help").stdout.split())
    assert "an integer >= the window (32 by default; 1e3 means 1000)" in help_text
    proc = cli("summarize", str(doc), "--model", str(tiny), "--budget", "1")
    assert proc.returncode == 2
    assert "--budget must be an integer >= the window (32, always kept)" in one_line_error(proc)
    proc = cli("summarize", str(doc), "--model", str(tiny), "--budget", "2.5", "--window", "16")
    assert proc.returncode == 2
    line = one_line_error(proc)
    assert "integer >= the window (16" in line and "fraction" in line and "2.5" in line
    proc = cli("summarize", str(doc), "--model", str(tiny), "--budget", "1e3", "--max-tokens", "2", "--json",
               "--quiet", "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["stats"]["budget"] == 1000


@pytest.mark.parametrize("args, code, text", [
    (["summarize", "{tmp}/nope.md"], 1, "cannot read {tmp}/nope.md: No such file or directory"),
    (["summarize", "{tmp}"], 1, "cannot read {tmp}: Is a directory"),
    (["summarize", "{tmp}/empty.md"], 1, "{tmp}/empty.md is empty"),
    (["summarize", "{doc}", "--model", "{tmp}"], 2, "--model: {tmp} is a directory"),
    (["summarize", "{doc}", "--max-tokens", "-3"], 2, "argument --max-tokens: must be >= 1, got -3"),
    (["summarize", "{doc}", "--threads", "0"], 2, "argument --threads/-t: must be >= 1, got 0"),
    (["summarize", "{doc}", "--n-ctx", "1.5"], 2, "argument --n-ctx: not an integer: '1.5'"),
    (["summarize", "{doc}", "--n-ctx", "abc"], 2, "argument --n-ctx: not an integer: 'abc'"),
    (["chat", "--threads", "0"], 2, "argument --threads/-t: must be >= 1, got 0"),
    (["eval", "fidelity", "--json", "{tmp}/no/dir/out.json"], 2, "--json: the folder {tmp}/no/dir does not exist"),
    (["eval", "fidelity", "--json", "-", "--plot", "{tmp}/no/p.png"], 2, "--plot: the folder {tmp}/no does not exist"),
    (["eval", "tasks", "--plot", "{tmp}"], 2, "--plot: {tmp} is a directory"),
    (["bench", "--json", "{tmp}/no/b.json"], 2, "--json: the folder {tmp}/no does not exist"),
])
def test_bad_input_gets_one_line_and_its_exit_code(tiny, doc, tmp_path, args, code, text):
    (tmp_path / "empty.md").write_text("  \n")
    fill = {"tmp": str(tmp_path), "doc": str(doc)}
    argv = [a.format(**fill) for a in args]
    if "--model" not in argv:
        argv += ["--model", str(tiny)]
    proc = cli(*argv, input="")
    assert proc.returncode == code, proc.stderr
    assert text.format(**fill) in one_line_error(proc)


def test_chat_through_a_pipe(tiny):
    script = f"{DOC}\n/stats\nSecond question, long enough to be compressed again after the first.\n/exit\n/stats\n"
    proc = cli("chat", "--lines", "--model", str(tiny), "--max-tokens", "6", *EVICT, input=script)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # no banner, prompts or progress off a terminal
    assert "you>" not in proc.stdout
    assert proc.stdout.count("last eviction: ada-snapkv, budget 64 cells per head") == 1  # /exit ended it
    assert "KV cache: " in proc.stdout and " -> " in proc.stdout


def test_chat_reset_and_eof(tiny):
    proc = cli("chat", "--lines", "--model", str(tiny), "--max-tokens", "4", "--system", "Be brief.", *EVICT,
               input=f"{DOC}\n/reset\n/stats\n/help\nhi\n")
    assert proc.returncode == 0, proc.stderr
    assert "conversation and KV cache cleared" in proc.stdout
    assert "no eviction yet" in proc.stdout and "/exit" in proc.stdout


@pytest.mark.slow
def test_summarize_smollm2(tmp_path):
    text = EXAMPLE.read_text()[:2500]  # ~550 tokens: a few seconds of prefill on 2 cores
    part = tmp_path / "part.md"
    part.write_text(text)
    proc = cli("summarize", str(part), "--max-tokens", "16", "--budget", "128", "--threads", "1", "--json",
               timeout=1200)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["summary"].strip()
    s = out["stats"]
    assert s["compressed"] and s["kv_cells_after"] < s["kv_cells_before"] == s["prompt_tokens"]
    from adakv_local.models import model_path

    assert s["kv_bytes_before"] == s["prompt_tokens"] * native_cell_bytes(model_path("smollm2-135m", quiet=True))


@pytest.mark.slow
def test_chat_smollm2():
    proc = cli("chat", "--lines", "--max-tokens", "12", "--threads", "1", "--budget", "64",
               input="What is a KV cache in a language model? Answer in one sentence please.\n/stats\n/exit\n",
               timeout=1200)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() and "Traceback" not in proc.stderr
    assert "last eviction" in proc.stdout or "last turn: not compressed" in proc.stdout


@pytest.mark.slow
def test_readme_quickstart_command():
    """`adakv-local summarize examples/ada-kv.md`, as the README's quickstart runs it (defaults only)."""
    proc = cli("summarize", str(EXAMPLE), timeout=1800)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.split()) >= 10 and "Traceback" not in proc.stderr


def test_example_document_is_a_real_article():
    words = EXAMPLE.read_text().split()
    assert 1500 <= len(words) <= 2500


def test_sampling_flags_reach_the_sampler(tiny, doc):
    """--top-k 1 makes any temperature greedy; without it a high temperature samples something else."""
    def summary(*flags: str) -> str:
        proc = cli("summarize", str(doc), "--model", str(tiny), "--max-tokens", "12", "--json", "--quiet", *EVICT,
                   *flags)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)["summary"]

    greedy = summary()
    assert summary("--temperature", "1.5", "--top-k", "1", "--seed", "3") == greedy
    assert summary("--temperature", "1.5", "--top-k", "0", "--top-p", "1", "--seed", "3") != greedy
    proc = cli("summarize", str(doc), "--model", str(tiny), "--top-p", "1.5")
    assert proc.returncode == 2 and "--top-p: must be a number from 0 to 1" in one_line_error(proc)
