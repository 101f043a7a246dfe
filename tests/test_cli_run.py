"""`adakv-local summarize` and `adakv-local chat`, run as a subprocess as a user would.

The CLI is the installed `adakv-local` script when there is one on PATH (CI), else
`python -m adakv_local` from the current directory with the inherited environment (a source
tree with ADAKV_LIB_DIR). Most tests use a tiny random model (one token per character, never
EOS); those marked slow use SmolLM2-135M. Everything runs with --threads 1: on a busy 2-core
machine, spinning ggml threads slow decoding down a hundredfold.
"""

from __future__ import annotations

import json
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


def cli(*args: str, input: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    exe = shutil.which("adakv-local")
    cmd = [exe] if exe else [sys.executable, "-m", "adakv_local"]
    return subprocess.run([*cmd, *args], input=input, capture_output=True, text=True, timeout=timeout)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("adakv-local: error: ") or lines[0].startswith("adakv-local summarize: error: ")
    return lines[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from adakv_local.models.testmodel import write_llama_gguf

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
    # tiny model: 2 layers x 2 KV heads x (64 + 64) f16 values per cell
    assert s["kv_bytes_before"] == s["kv_cells_before"] * 2 * 2 * 128 * 2
    assert s["completion_tokens"] == 12
    assert s["prefill_tps"] > 0 and s["decode_tps"] > 0
    assert set(s["seconds"]) == {"score", "allocate", "compact"}
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
    assert "KV cache:" in proc.stderr and "eviction: score" in proc.stderr


def test_summarize_quiet_and_short_prompt_within_budget(tiny, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("A short note.")
    proc = cli("summarize", str(short), "--model", str(tiny), "--max-tokens", "4", "--json", "--quiet",
               "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    s = json.loads(proc.stdout)["stats"]
    assert s["compressed"] is False and s["kv_cells_after"] == s["kv_cells_before"] == s["prompt_tokens"]


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


def test_too_long_document_fails_with_a_plain_message(tiny, doc, tmp_path):
    proc = cli("summarize", str(doc), "--model", str(tiny), "--n-ctx", "512")
    assert proc.returncode == 1
    line = one_line_error(proc)
    assert "too long" in line and "--max-tokens" in line and "--n-ctx" in line and "split" in line
    huge = tmp_path / "huge.txt"
    huge.write_text(DOC * 7)  # ~5000 tokens, the tiny model was trained for 4096
    proc = cli("summarize", str(huge), "--model", str(tiny))
    assert proc.returncode == 1
    line = one_line_error(proc)
    assert "too long" in line and "4096" in line


def test_chat_through_a_pipe(tiny):
    script = f"{DOC}\n/stats\nSecond question, long enough to be compressed again after the first.\n/exit\n/stats\n"
    proc = cli("chat", "--model", str(tiny), "--max-tokens", "6", *EVICT, input=script)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # no banner, prompts or progress off a terminal
    assert "you>" not in proc.stdout
    assert proc.stdout.count("last eviction: ada-snapkv, budget 64 cells per head") == 1  # /exit ended it
    assert "KV cache: " in proc.stdout and " -> " in proc.stdout


def test_chat_reset_and_eof(tiny):
    proc = cli("chat", "--model", str(tiny), "--max-tokens", "4", "--system", "Be brief.", *EVICT,
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
    # SmolLM2: 30 layers x 3 KV heads x (64 + 64) f16 values per cell
    assert s["kv_bytes_before"] == s["prompt_tokens"] * 30 * 3 * 128 * 2


@pytest.mark.slow
def test_chat_smollm2():
    proc = cli("chat", "--max-tokens", "12", "--threads", "1", "--budget", "64",
               input="What is a KV cache in a language model? Answer in one sentence please.\n/stats\n/exit\n",
               timeout=1200)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() and "Traceback" not in proc.stderr
    assert "last eviction" in proc.stdout or "no eviction yet" in proc.stdout


@pytest.mark.slow
def test_readme_quickstart_command():
    """`adakv-local summarize examples/ada-kv.md`, as the README's quickstart runs it (defaults only)."""
    proc = cli("summarize", str(EXAMPLE), timeout=1800)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.split()) >= 10 and "Traceback" not in proc.stderr


def test_example_document_is_a_real_article():
    words = EXAMPLE.read_text().split()
    assert 1500 <= len(words) <= 2500
