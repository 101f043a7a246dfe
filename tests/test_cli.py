"""The command line, run as a subprocess as a user would."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def cli(*args: str, **kw) -> subprocess.CompletedProcess:
    exe = shutil.which("adakv-local")
    cmd = [exe] if exe else [sys.executable, "-m", "adakv_local"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, cwd="/", **kw)


def test_help_exits_zero_and_explains():
    proc = cli("--help")
    assert proc.returncode == 0
    assert "models" in proc.stdout and "info" in proc.stdout
    for sub in (["models", "--help"], ["models", "path", "--help"], ["info", "--help"]):
        p = cli(*sub)
        assert p.returncode == 0, (sub, p.stderr)


def test_models_list_json():
    proc = cli("models", "list", "--json")
    assert proc.returncode == 0, proc.stderr
    names = {m["name"] for m in json.loads(proc.stdout)}
    assert {"smollm2-135m", "gemma3-270m"} <= names


def test_unknown_model_is_a_usage_error_without_traceback():
    proc = cli("models", "path", "no-such-model")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "smollm2-135m" in proc.stderr  # the message lists the known names
    assert len(proc.stderr.strip().splitlines()) == 1


def test_info_reports_library_and_backends():
    proc = cli("info", "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert "CPU" in info["backends"]
    assert Path(info["library"]).exists()
    assert info["llama_cpp_commit"].startswith("0c1e570")


@pytest.mark.slow
def test_models_path_smollm2_prints_an_existing_gguf():
    proc = cli("models", "path", "smollm2-135m", timeout=1200)
    assert proc.returncode == 0, proc.stderr
    path = Path(proc.stdout.strip())
    assert path.is_file() and path.suffix == ".gguf"
    assert path.open("rb").read(4) == b"GGUF"


@pytest.mark.parametrize("args, text", [
    ([], "adakv-local: error: the following arguments are required: COMMAND (see `adakv-local --help`)"),
    (["models", "path"], "adakv-local models path: error: the following arguments are required: name"),
    (["summarize", "--no-such-flag"], "adakv-local: error: unrecognized arguments: --no-such-flag"),
    (["summarize", "--temperature", "hot"], "adakv-local summarize: error: argument --temperature: not a number"),
    (["summarize", "--budget", "lots"], "adakv-local summarize: error: argument --budget: not a number: 'lots'"),
])
def test_argument_errors_are_one_line_exit_2(args, text):
    proc = cli(*args)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and text in proc.stderr, proc.stderr


def test_models_are_cached_under_adakv_cache_dir(tmp_path, monkeypatch):
    """ADAKV_CACHE_DIR is the cache of the llama.cpp source and of the models (README, *Environment*)."""
    from adakv_local.models import cache_dir, model_path

    monkeypatch.setenv("ADAKV_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "cache" / "models"
    assert model_path("smollm2-135m", pull=False).parent == tmp_path / "cache" / "models"
    monkeypatch.delenv("ADAKV_CACHE_DIR")
    assert cache_dir() == tmp_path / "xdg" / "adakv-local" / "models"
    monkeypatch.setenv("ADAKV_CACHE_DIR", "")  # set but empty: as if unset (as the build treats it)
    assert cache_dir() == tmp_path / "xdg" / "adakv-local" / "models"


def test_models_path_and_list_honour_adakv_cache_dir(tmp_path):
    """A model file in $ADAKV_CACHE_DIR/models is found there (size check only, no download)."""
    import os

    from adakv_local.models import MODELS

    spec = MODELS["smollm2-135m"]
    models = tmp_path / "models"
    models.mkdir()
    with open(models / spec.filename, "wb") as f:
        f.truncate(spec.size_bytes)  # sparse: the size is what `is_cached` checks
    env = {**os.environ, "ADAKV_CACHE_DIR": str(tmp_path)}
    proc = cli("models", "path", "smollm2-135m", "--no-pull", env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(models / spec.filename)
    rows = {r["name"]: r for r in json.loads(cli("models", "list", "--json", env=env).stdout)}
    assert rows["smollm2-135m"]["cached"] is True
    help_text = " ".join(cli("models", "--help").stdout.split())
    assert "$ADAKV_CACHE_DIR/models" in help_text


@pytest.mark.parametrize("cpus, expected", [(1, (1, 1)), (2, (1, 2)), (8, (4, 8)), (16, (8, 16))])
def test_default_threads_are_llama_cpp_pythons(cpus, expected):
    """Half the logical CPUs for generating (its Llama's n_threads), all of them for prompts (n_threads_batch)."""
    from adakv_local.cli.common import thread_counts

    assert thread_counts(None, cpus) == expected
    assert thread_counts(3, cpus) == (3, 3)  # --threads N: N for both


def test_threads_help_says_the_default_and_why():
    for command in (["summarize"], ["chat"], ["serve"], ["eval", "fidelity"], ["bench"]):
        text = " ".join(cli(*command, "--help").stdout.split())
        assert "half the logical CPUs" in text and "spin" in text, (command, text)
    assert "all cores" not in " ".join(cli("summarize", "--help").stdout.split())


def test_the_model_gets_the_default_threads(tiny_llama):
    import os

    from adakv_local.cli import build_parser
    from adakv_local.cli.common import available_cpus, config_from_args, load_llama

    args = build_parser().parse_args(["chat", "--model", str(tiny_llama)])
    llm = load_llama(tiny_llama, config_from_args(args), args, 256)
    try:
        cpus = available_cpus()
        assert cpus <= (os.cpu_count() or 1)
        assert (llm.n_threads, llm.n_threads_batch) == (max(cpus // 2, 1), cpus)
    finally:
        llm.close()
