"""`adakv-local serve`, started as a subprocess on a free localhost port and driven with the official
`openai` client, as a chat front end would drive it.

The model is a tiny random one (one token per character, never EOS, trained context 2048), so
the ~1,500-character first message is ~1,500 tokens and replies always run to max_tokens. Replies
are greedy (temperature 0), so two servers given the same conversation answer the same.
Needs the server extra and the openai package (`pip install '.[test]'`).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from adakv_local.cli.serve import STATS_FIELD, missing_server_modules

_missing = missing_server_modules() + [m for m in ("openai",) if __import__("importlib").util.find_spec(m) is None]
needs_server = pytest.mark.skipif(bool(_missing), reason=f"needs the server extra and openai ({', '.join(_missing)} "
                                  "not installed): pip install '.[test]'")

N_CTX_TRAIN = 2048
EVICT = ["--budget", "64", "--window", "16", "--threads", "1", "--seed", "7"]
# ~1,500 characters, one token each: far above the budget of 64
FIRST = " ".join(f"Line {i}: the keeper logged wind {i % 9} and fog {i % 4} at the harbour." for i in range(30))[:1500]
SECOND = "What did the keeper log on line 7?"


def _cmd() -> list[str]:
    exe = shutil.which("adakv-local")
    return [exe] if exe else [sys.executable, "-m", "adakv_local"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """One `adakv-local serve` process; stderr goes to a file (the per-request log lines)."""

    def __init__(self, model: Path, log: Path, *extra: str) -> None:
        self.port = _free_port()
        self.log = log
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self._err = log.open("w")
        self.proc = subprocess.Popen([*_cmd(), "serve", "--model", str(model), "--port", str(self.port), *EVICT,
                                      *extra], stdout=subprocess.DEVNULL, stderr=self._err)
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited with {self.proc.returncode}: {log.read_text()}")
            try:
                with urllib.request.urlopen(f"{self.base_url}/models", timeout=2) as r:
                    if r.status == 200:
                        break
            except urllib.error.HTTPError as e:
                if e.code == 401:  # it answers: it wants the key
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"serve did not answer within 120 s: {log.read_text()}")
            time.sleep(0.3)

    def client(self) -> Any:
        import openai

        return openai.OpenAI(base_url=self.base_url, api_key="unused", max_retries=0, timeout=120)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._err.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from adakv_local.testing import write_llama_gguf

    return write_llama_gguf(tmp_path_factory.mktemp("serve") / "tiny.gguf", n_embd=256, n_head=4, n_head_kv=2,
                            n_ff=256, n_ctx_train=N_CTX_TRAIN, seed=5)


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory) -> Iterator[Server]:
    if _missing:
        pytest.skip(f"needs {', '.join(_missing)}")
    s = Server(tiny, tmp_path_factory.mktemp("serve-log") / "serve.log")
    yield s
    s.stop()


def stats_of(obj: Any) -> dict[str, Any]:
    extra = obj.model_extra or {}
    assert STATS_FIELD in extra, f"no {STATS_FIELD!r} field in {obj}"
    return extra[STATS_FIELD]


def chat(client: Any, messages: list[dict[str, str]], max_tokens: int = 12, model: str = "tiny"
         ) -> tuple[str, dict[str, Any]]:
    r = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0)
    return r.choices[0].message.content, stats_of(r)


@needs_server
def test_models_lists_the_alias(server):
    assert [m.id for m in server.client().models.list().data] == ["tiny"]


@needs_server
def test_two_turns_the_second_streamed_evaluates_only_what_is_new(server):
    client = server.client()
    history = [{"role": "user", "content": FIRST}]
    reply1, s1 = chat(client, history)
    assert s1["prompt_tokens"] > 1400 and s1["prefill_tokens"] == s1["prompt_tokens"], s1
    assert s1["compressed"] and s1["kv_cells_after"] < s1["prompt_tokens"] // 4, s1
    assert s1["kv_cells_kept_mean"] == pytest.approx(64, abs=0.5), s1  # the budget, per KV head

    history += [{"role": "assistant", "content": reply1}, {"role": "user", "content": SECOND}]
    stream = client.chat.completions.create(model="tiny", messages=history, max_tokens=12, temperature=0,
                                            stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip(), chunks
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason is not None]
    assert len(finals) == 1
    s2 = stats_of(finals[0])
    new = s2["prompt_tokens"] - s1["prompt_tokens"]  # the reply, the new message, their template
    assert new > len(SECOND)
    # only what turn 1 did not evaluate: its reply's last token (sampled, never evaluated) and the rest
    assert 1 <= s2["prefill_tokens"] <= new, (s1, s2)
    assert s2["prefill_tokens"] < s2["prompt_tokens"] // 10, s2
    assert s2["compressed"], s2  # compressed again, with the new turn's own window
    assert s2["completion_tokens"] == 12

    log = server.log.read_text()
    lines = [ln for ln in log.splitlines() if "adakv-local serve: request" in ln]
    assert f"prompt {s2['prompt_tokens']} tokens, evaluated {s2['prefill_tokens']}," in lines[-1], log
    assert "t/s" in lines[-1] and "cells per layer" in lines[-1]


@needs_server
def test_an_edited_history_answers_as_a_fresh_server(server, tiny, tmp_path):
    client = server.client()
    history = [{"role": "user", "content": FIRST}]
    reply1, _ = chat(client, history)
    history += [{"role": "assistant", "content": reply1}, {"role": "user", "content": SECOND}]
    chat(client, history)  # the cache now holds the compressed two turns
    # edit the first message near its start: the history diverges inside the compressed block
    edited = [{"role": "user", "content": "Line 0: calm." + FIRST[13:]}, *history[1:]]
    answer, s = chat(client, edited)
    assert s["prefill_tokens"] == s["prompt_tokens"], s  # evaluated again from an empty cache

    fresh = Server(tiny, tmp_path / "fresh.log")
    try:
        fresh_answer, fresh_s = chat(fresh.client(), edited)
    finally:
        fresh.stop()
    assert answer == fresh_answer
    for key in ("prompt_tokens", "prefill_tokens", "kv_cells_after", "kv_cells_kept_mean", "completion_tokens"):
        assert s[key] == fresh_s[key], (key, s, fresh_s)


def _post(url: str, body: bytes) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@needs_server
@pytest.mark.parametrize("case, stream", [
    ("negative max_tokens", False), ("unknown model", False), ("over the trained context", False),
    ("negative max_tokens", True), ("unknown model", True), ("over the trained context", True),
    ("malformed JSON", False), ("not a chat request", False),
])
def test_a_bad_request_gets_a_4xx_and_the_next_one_succeeds(server, case, stream):
    import openai

    client = server.client()
    user = [{"role": "user", "content": "hello"}]
    if case == "malformed JSON":
        status, body = _post(f"{server.base_url}/chat/completions", b'{"messages": [{"role": "user"')
        assert status == 400 and "not valid JSON" in body["error"]["message"], body
    elif case == "not a chat request":
        status, body = _post(f"{server.base_url}/chat/completions", json.dumps({"messages": "hi"}).encode())
        assert status == 422 and body["error"]["param"] == "messages", body
    else:
        kwargs: dict[str, Any] = {"model": "tiny", "messages": user, "max_tokens": 4, "stream": stream}
        if case == "negative max_tokens":
            kwargs["max_tokens"] = -5
        elif case == "unknown model":
            kwargs["model"] = "gpt-4o"
        else:
            kwargs["messages"] = [{"role": "user", "content": "x" * (N_CTX_TRAIN + 100)}]
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(**kwargs)
        message = e.value.body["message"] if isinstance(e.value.body, dict) else str(e.value)
        expected = {"negative max_tokens": "max_tokens must be 0 or more", "unknown model": "`gpt-4o` does not exist",
                    "over the trained context": f"maximum context length is {N_CTX_TRAIN} tokens"}[case]
        assert expected in message, message
    expected_log = {"negative max_tokens": "rejected with 400: max_tokens must be 0 or more",
                    "unknown model": "rejected with 400: The model `gpt-4o` does not exist",
                    "over the trained context": f"rejected with 400: This model's maximum context length is "
                                                f"{N_CTX_TRAIN}",
                    "malformed JSON": "rejected with 400: the request body is not valid JSON",
                    "not a chat request": "rejected with 422: invalid request: messages: "}[case]
    rejected = _rejected_lines(server)
    assert rejected and rejected[-1].startswith("adakv-local serve: POST /v1/chat/completions rejected with"), rejected
    assert expected_log in rejected[-1], rejected[-1]
    reply, s = chat(client, user, max_tokens=3)
    assert reply and s["completion_tokens"] == 3
    assert server.proc.poll() is None
    assert len(_rejected_lines(server)) == len(rejected)  # a good request is not logged as rejected


def _rejected_lines(server: Server) -> list[str]:
    deadline = time.monotonic() + 5  # the line is written as the response goes out
    while True:
        lines = [ln for ln in server.log.read_text().splitlines() if " rejected with " in ln]
        if lines or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


@needs_server
def test_ordinary_requests_log_no_native_warnings(server):
    """A history that diverges inside the compressed block is refused natively and evaluated again: that is
    ordinary (every edited or regenerated turn does it), so the refusal is llama.cpp debug output (--verbose)."""
    client = server.client()
    history = [{"role": "user", "content": FIRST}]
    reply1, _ = chat(client, history)
    chat(client, [*history, {"role": "assistant", "content": reply1}, {"role": "user", "content": SECOND}])
    _, s = chat(client, [{"role": "user", "content": "Line 0: still." + FIRST[14:]}])
    assert s["prefill_tokens"] == s["prompt_tokens"], s  # it did diverge inside the block
    log = server.log.read_text()
    assert "refusing to remove positions" not in log, log


@needs_server
def test_plain_completions_carry_the_stats(server):
    r = server.client().completions.create(model="tiny", prompt=FIRST, max_tokens=4, temperature=0)
    s = stats_of(r)
    assert s["compressed"] and s["completion_tokens"] == 4 and s["prompt_tokens"] > 1400


def test_serve_without_the_server_extra_says_what_to_install(tiny, monkeypatch, capsys):
    from adakv_local import cli
    from adakv_local.cli import serve

    monkeypatch.setattr(serve, "SERVER_MODULES", ("adakv_no_such_module",))
    assert cli.main(["serve", "--model", str(tiny)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == ("adakv-local: error: serve needs the server extra (adakv_no_such_module not "
                   "installed): pip install 'adakv-local[server]'")


def test_serve_help_names_the_settings_it_changes():
    proc = subprocess.run([*_cmd(), "serve", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    assert "flash attention is on" in text and "flash_attn=False" in text
    assert "--budget" in text and "--port" in text and STATS_FIELD in text


@needs_server
@pytest.mark.slow
def test_smollm2_two_turns_then_an_edited_history(tmp_path):
    """The same with a real model (SmolLM2-135M, ~1,500-token first message): turn 2 streamed and
    evaluating only what is new, then an edited first message answered as by a fresh server."""
    from adakv_local.eval.texts import documents

    name, text = next(documents(min_chars=8000))
    first = f"{text[:6500]}\n\nWhat is this text about?"
    a = Server(Path("smollm2-135m"), tmp_path / "a.log", "--n-ctx", "4096")
    try:
        client = a.client()
        history = [{"role": "user", "content": first}]
        reply1, s1 = chat(client, history, max_tokens=24, model="smollm2-135m")
        assert 1200 <= s1["prompt_tokens"] <= 2000 and s1["compressed"], s1
        history += [{"role": "assistant", "content": reply1}, {"role": "user", "content": "Say it in one line."}]
        chunks = list(client.chat.completions.create(model="smollm2-135m", messages=history, max_tokens=24,
                                                     temperature=0, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip()
        s2 = stats_of([c for c in chunks if c.choices and c.choices[0].finish_reason][0])
        assert 1 <= s2["prefill_tokens"] <= s2["prompt_tokens"] - s1["prompt_tokens"], (s1, s2)
        edited = [{"role": "user", "content": "Read this carefully. " + first}, *history[1:]]
        answer, s = chat(client, edited, max_tokens=24, model="smollm2-135m")
        assert s["prefill_tokens"] == s["prompt_tokens"], s
    finally:
        a.stop()
    b = Server(Path("smollm2-135m"), tmp_path / "b.log", "--n-ctx", "4096")
    try:
        fresh_answer, fresh_s = chat(b.client(), edited, max_tokens=24, model="smollm2-135m")
    finally:
        b.stop()
    assert answer == fresh_answer, (name, answer, fresh_answer)
    assert s["kv_cells_after"] == fresh_s["kv_cells_after"]


def test_a_port_in_use_is_refused_before_the_model_loads(tiny, capsys):
    from adakv_local import cli

    if _missing:
        pytest.skip(f"needs {', '.join(_missing)}")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert cli.main(["serve", "--model", str(tiny), "--port", str(port)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"adakv-local: error: cannot listen on 127.0.0.1:{port}: ") and "--port" in err, err


# ~1,400 characters: a second conversation, different from the first from its first token on and shorter (its
# prompt_tokens tell its stats from the first one's)
OTHER = " ".join(f"Entry {i}: the pilot noted tide {i % 7} and swell {i % 5} off the cape." for i in range(32))[:1400]


def _ask(client: Any, content: str, stream: bool, max_tokens: int) -> tuple[str, dict[str, Any], int | None]:
    """One request: (the answer, its adakv stats, its usage's prompt tokens when not streamed)."""
    messages = [{"role": "user", "content": content}]
    if not stream:
        r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=max_tokens, temperature=0)
        return r.choices[0].message.content, stats_of(r), r.usage.prompt_tokens
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=max_tokens,
                                                 temperature=0, stream=True))
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason is not None]
    assert len(finals) == 1, f"a stream of {len(chunks)} chunks with {len(finals)} final ones (cut short?)"
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), stats_of(finals[0]), None


@needs_server
def test_concurrent_requests_each_carry_their_own_stats_and_answer_as_one_by_one(tiny, tmp_path):
    """8 requests at once (two conversations, streamed and not, each its own max_tokens, which the tiny
    model always reaches): llama-cpp-python's server serializes them on its model lock, files the stats on
    the thread pool and takes them back out on the event loop. Each response must carry its own request's
    stats, and every answer must equal the answer to the same request sent alone. (Each request is a first
    turn, whose answer does not depend on what the server evaluated before: a later turn's does, by design,
    since it reuses the cached compressed prefix.)"""
    from concurrent.futures import ThreadPoolExecutor

    requests = [(doc, stream, 3 + i) for i, (doc, stream) in
                enumerate((d, s) for d in (FIRST, OTHER) for s in (False, True, False, True))]
    s = Server(tiny, tmp_path / "serve.log")
    try:
        client = s.client()
        with ThreadPoolExecutor(len(requests)) as pool:
            together = list(pool.map(lambda r: _ask(client, *r), requests))
        alone = [_ask(client, *r) for r in requests]
    finally:
        s.stop()
    prompt_tokens = {doc: {a[2] for (d, stream, _), a in zip(requests, alone + together) if d == doc and not stream}
                     for doc in (FIRST, OTHER)}
    assert all(len(v) == 1 for v in prompt_tokens.values()) and len(set().union(*prompt_tokens.values())) == 2
    for (doc, stream, max_tokens), (text, stats, _), (text1, stats1, _) in zip(requests, together, alone):
        case = f"{'stream' if stream else 'plain'}, max_tokens {max_tokens}, conversation {'AB'[doc is OTHER]}"
        assert text == text1, case
        for st in (stats, stats1):
            assert st["completion_tokens"] == max_tokens, (case, st)  # this request's stats, no other's
            assert st["prompt_tokens"] == next(iter(prompt_tokens[doc])) == st["prefill_tokens"], (case, st)
            assert st["compressed"] and st["kv_cells_before"] == st["prompt_tokens"], (case, st)
    log = [ln for ln in s.log.read_text().splitlines() if "adakv-local serve: request" in ln]
    assert len(log) == 2 * len(requests) and not any("stopped early" in ln for ln in log), log


# --- several conversations: saved compressed states (issue 26) -----------------------------------------

TITLE = "Create a concise, 3-5 word title for this chat:\n{}"
TAGS = "Generate 1-3 broad tags categorizing this chat:\n{}"


def _front_end(client: Any, with_side_requests: bool = True) -> dict[str, list[tuple[str, dict[str, Any]]]]:
    """A front end's pattern: conversation A's first turn, its title and tags requests (the conversation
    quoted in one new message), conversation B interleaved, then A's and B's later turns. Returns each
    conversation's (answer, stats) per turn."""
    a = [{"role": "user", "content": FIRST}]
    b = [{"role": "user", "content": OTHER}]
    out: dict[str, list[tuple[str, dict[str, Any]]]] = {"A": [], "B": []}

    def step(name: str, history: list[dict[str, str]], question: str | None) -> None:
        if question is not None:
            history += [{"role": "user", "content": question}]
        answer, stats = chat(client, history)
        out[name].append((answer, stats))
        history.append({"role": "assistant", "content": answer})

    step("A", a, None)
    if with_side_requests:
        quoted = f"USER: {FIRST}\nASSISTANT: {a[-1]['content']}"
        for template in (TITLE, TAGS):
            chat(client, [{"role": "user", "content": template.format(quoted)}])
    step("B", b, None)
    step("A", a, SECOND)
    step("B", b, "And the swell on entry 3?")
    step("A", a, "Summarize line 2.")
    return out


@needs_server
def test_conversations_resume_from_their_saved_states_and_answer_as_served_alone(tiny, tmp_path):
    s = Server(tiny, tmp_path / "serve.log")
    try:
        together = _front_end(s.client())
        with urllib.request.urlopen(f"{s.base_url}/adakv/states", timeout=10) as r:
            saved = json.loads(r.read())
    finally:
        s.stop()
    alone: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for name in ("A", "B"):
        solo = Server(tiny, tmp_path / f"alone-{name}.log")
        try:
            alone[name] = [x for x in _front_end(solo.client(), with_side_requests=False)[name]]
        finally:
            solo.stop()
        # alone: the other conversation is not sent at all
    for name in ("A", "B"):
        for t, ((answer, st), (answer1, st1)) in enumerate(zip(together[name], alone[name])):
            case = f"conversation {name}, turn {t + 1}"
            assert answer == answer1, case
            for key in ("prompt_tokens", "kv_cells_after", "kv_cells_kept_mean", "completion_tokens"):
                assert st[key] == st1[key], (case, key, st, st1)
            if t == 0:
                assert st["prefill_tokens"] == st["prompt_tokens"] and st["state_resumed_tokens"] == 0, (case, st)
            else:  # resumed from its own state: only the new tokens are evaluated
                assert st["state_resumed_tokens"] > 1000, (case, st)
                assert st["prefill_tokens"] == st1["prefill_tokens"] < 80, (case, st, st1)
            assert st["cache_bytes"] > 0 and st["cache_states"] >= 1, st
    # seven requests, a state saved after each; each is the compressed cache, not the conversation
    assert len(saved["states"]) == 7 and saved["bytes"] == sum(e["bytes"] for e in saved["states"])
    per_cell = together["A"][0][1]["kv_bytes_after"] / together["A"][0][1]["kv_cells_after"]
    for e in saved["states"]:
        assert e["bytes"] < per_cell * 400 + 200_000, e  # at most ~(budget + a reply) cells, and the logits
    log = (tmp_path / "serve.log").read_text()
    assert "resumed from a saved state of" in log and "saved states" in log


@needs_server
def test_without_saved_states_a_conversation_interrupted_by_another_is_read_again(tiny, tmp_path):
    s = Server(tiny, tmp_path / "serve.log", "--cache-bytes", "0")
    try:
        out = _front_end(s.client(), with_side_requests=False)
    finally:
        s.stop()
    turn2 = out["A"][1][1]
    assert turn2["prefill_tokens"] == turn2["prompt_tokens"] and "cache_bytes" not in turn2, turn2


@needs_server
def test_saved_states_in_files_survive_a_restart(tiny, tmp_path):
    history = [{"role": "user", "content": FIRST}]
    s = Server(tiny, tmp_path / "a.log", "--cache-dir", str(tmp_path / "states"))
    try:
        reply, _ = chat(s.client(), history)
    finally:
        s.stop()
    history += [{"role": "assistant", "content": reply}, {"role": "user", "content": SECOND}]
    s = Server(tiny, tmp_path / "b.log", "--cache-dir", str(tmp_path / "states"))
    try:
        _, st = chat(s.client(), history)
    finally:
        s.stop()
    assert st["state_resumed_tokens"] > 1000 and st["prefill_tokens"] < 80, st
    assert len(list((tmp_path / "states").glob("*/*.npz"))) == 2


@needs_server
def test_a_client_that_goes_away_mid_stream_does_not_block_the_next_request(server):
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": OTHER}], "max_tokens": 200,
                       "temperature": 0, "stream": True})
    conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200 and r.readline().startswith(b"data: ")
    conn.close()  # gone after its first chunk
    reply, s = chat(server.client(), [{"role": "user", "content": "hello"}], max_tokens=3)
    assert reply and s["completion_tokens"] == 3
    log = server.log.read_text()
    assert "(stopped early)" in log, log


@needs_server
def test_the_api_key_is_asked_for(tiny, tmp_path):
    import openai

    s = Server(tiny, tmp_path / "serve.log", "--api-key", "sesame")
    try:
        with pytest.raises(openai.AuthenticationError):
            s.client().models.list()
        ok = openai.OpenAI(base_url=s.base_url, api_key="sesame", max_retries=0, timeout=60)
        assert [m.id for m in ok.models.list().data] == ["tiny"]
    finally:
        s.stop()


def test_a_bad_cache_size_is_a_usage_error(tiny, capsys):
    from adakv_local import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["serve", "--model", str(tiny), "--cache-bytes", "lots"])
    assert e.value.code == 2
    assert "--cache-bytes: not a size: 'lots'" in capsys.readouterr().err


@needs_server
def test_a_conversation_the_settings_cannot_read_gets_a_400_that_says_why(tiny, tmp_path):
    """A prompt longer than the cache is read in chunks; with a budget that leaves no room for a chunk
    after the compressed block, the request is refused before anything is evaluated."""
    import openai

    s = Server(tiny, tmp_path / "serve.log", "--n-ctx", "256", "--budget", "240")
    try:
        with pytest.raises(openai.BadRequestError) as e:
            chat(s.client(), [{"role": "user", "content": FIRST}])
        assert "too small to read" in e.value.body["message"] and "n_ctx >=" in e.value.body["message"], e.value.body
        reply, st = chat(s.client(), [{"role": "user", "content": "hello"}], max_tokens=3)
        assert reply and st["completion_tokens"] == 3
    finally:
        s.stop()
    assert "rejected with 400: n_ctx = 256 is too small" in (tmp_path / "serve.log").read_text()


def test_the_parts_of_llama_cpp_python_that_serve_uses_are_there():
    """serve and the saved conversations use these parts of llama-cpp-python (pinned to 0.3.36 in
    pyproject.toml): the request types and the fields read from them, and the prompt-cache protocol
    (BaseLlamaCache's methods; _create_completion looks the prompt up before it evaluates and saves the
    state after the last token). An upgrade that changes them fails here first."""
    import importlib.metadata
    import inspect

    import llama_cpp
    from llama_cpp.llama_cache import BaseLlamaCache
    from llama_cpp.server.types import CreateChatCompletionRequest, CreateCompletionRequest

    assert importlib.metadata.version("llama-cpp-python") == "0.3.36"
    used = {"model", "max_tokens", "stream", "logit_bias", "logit_bias_type", "grammar", "min_tokens", "n", "user"}
    assert used | {"messages"} <= set(CreateChatCompletionRequest.model_fields)
    assert used | {"prompt"} <= set(CreateCompletionRequest.model_fields)
    assert {"cache_size", "__getitem__", "__contains__", "__setitem__"} <= BaseLlamaCache.__abstractmethods__
    src = inspect.getsource(llama_cpp.Llama._create_completion)
    assert "cache_item = self.cache[prompt_tokens]" in src and "self.load_state(cache_item)" in src
    assert "self.cache[prompt_tokens + completion_tokens] = self.save_state()" in src


@needs_server
def test_interrupt_requests_ends_a_streamed_reply_when_another_request_waits(tiny, tmp_path):
    import http.client
    import threading

    s = Server(tiny, tmp_path / "serve.log", "--interrupt-requests")
    try:
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=120)
        body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": OTHER}], "max_tokens": 1000,
                           "temperature": 0, "stream": True})
        conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        first = r.readline()
        assert r.status == 200 and first.startswith(b"data: ")
        rest: list[bytes] = []
        reader = threading.Thread(target=lambda: rest.extend(r.read().split(b"\n\n")))
        reader.start()
        reply, st = chat(s.client(), [{"role": "user", "content": "hello"}], max_tokens=3)
        reader.join(120)
        conn.close()
    finally:
        s.stop()
    events = [json.loads(e[len(b"data: "):]) for e in [first.strip(), *rest] if e.startswith(b"data: {")]
    assert rest and rest[-2:] == [b"data: [DONE]", b""], rest[-3:]
    assert len(events) < 1000 and all(not (e.get("choices") and e["choices"][0].get("finish_reason")) for e in events)
    assert reply and st["completion_tokens"] == 3
    assert "(stopped early)" in (tmp_path / "serve.log").read_text()
