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
