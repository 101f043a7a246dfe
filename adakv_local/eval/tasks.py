"""Synthetic long-context retrieval tasks (kvpress / RULER style), generated locally from seeds.

Every prompt is built from small word lists, a seed and (facts) installed text. Five tasks:

* ``passkey``: a 5-digit pass key hidden in the classic repeated filler ("The grass is green. The
  sky is blue. ..."); the question asks for the key.
* ``needle``: one sentence "The special magic number for <city> is <7 digits>." hidden in varied
  filler sentences; the question asks for the city's number.
* ``multikey``: several such needles with different cities (and numbers); the question asks for one.
* ``vartrack``: variable tracking: a chain ``VAR ABCDE = 12345``, ``VAR FGHIJ = VAR ABCDE``, ... and a
  distractor chain with another value; the question asks for every variable that holds the value.
* ``facts``: one fact (a number, a date or a person's name, the seed picks which) stated once in a
  long natural document (the prose of the Python standard library's documentation, see
  :mod:`adakv_local.eval.texts`, which every Python has); the question asks for it.

Nothing here is downloaded; the facts task's document is read from the installed Python.

The seed fixes the hidden content (keys, numbers, names) and the filler; the target length and
the depth fix only where the content goes. ``depth`` is the fraction of the document's filler
sentences that come before the needle (0: first sentence, 1: last). The prompt's token count,
measured with the given tokenizer, is within a few percent of the target (usually within a
sentence's worth of tokens).

Two prompt modes:

* ``chat``: ``sample.prompt`` is the content of one user message (document, then question);
  ``sample.messages()`` gives the list for ``create_chat_completion``.
* ``raw``: ``sample.prompt`` is a completion prompt that ends where the answer starts (``... The
  pass key is``), for base models and ``create_completion``.

Examples:
    >>> s = passkey(str.split, 2000, 0.5, seed=3, mode="raw")
    >>> score(s, f" {s.answer}.")
    True
    >>> records = run_tasks(path, tasks=["passkey"], lengths=[3000], depths=[0.1, 0.5, 0.9],
    ...                     methods_budgets=[("full", None), ("ada-snapkv", 128)], n_samples=2, seed=0)
    >>> summarize(records)
"""

from __future__ import annotations

import math
import random
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Union

TASKS: tuple[str, ...] = ("passkey", "needle", "multikey", "vartrack", "facts")
MODES: tuple[str, ...] = ("chat", "raw")

#: anything that turns text into tokens: a callable ``str -> sequence`` (e.g. ``str.split``) or an
#: object with llama-cpp-python's ``tokenize(bytes, add_bos=...)`` (a ``Llama``, also ``vocab_only``)
Tokenizer = Union[Callable[[str], Sequence[Any]], Any]

#: called after every sample as ``progress(samples_done, samples_total, record)``
Progress = Callable[[int, int, dict[str, Any]], None]

# -- word lists ----------------------------------------------------------------------------------------

PASSKEY_FILLER: tuple[str, ...] = (
    "The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.",
)  # fmt: skip

_SUBJECTS = (
    "the old farmer", "a young student", "the quiet librarian", "my neighbour", "the tired traveller",
    "a curious child", "the village baker", "the ship's captain", "an elderly painter", "the new teacher",
    "a street musician", "the local doctor", "the gardener", "a retired sailor", "the shy poet",
)  # fmt: skip
_VERBS = (
    "carried", "painted", "found", "repaired", "described", "admired", "forgot", "cleaned", "borrowed",
    "noticed", "wrapped", "sold", "sketched", "polished", "hid",
)  # fmt: skip
_OBJECTS = (
    "a wooden chair", "the blue kettle", "an old map", "a basket of apples", "the broken clock",
    "a pair of boots", "the iron gate", "a bundle of letters", "the garden hose", "a woollen scarf",
    "the brass lamp", "a jar of honey", "the faded curtain", "a box of candles", "the heavy anchor",
)  # fmt: skip
_PLACES = (
    "near the harbour", "behind the barn", "in the market square", "beside the river", "at the top of the hill",
    "under the bridge", "in the dusty attic", "by the train station", "in the orchard", "along the coast road",
    "outside the bakery", "in the quiet chapel", "next to the well", "at the edge of the forest",
)  # fmt: skip
_TIMES = (
    "Early in the morning", "Late that evening", "On a rainy afternoon", "Just before sunset", "At noon",
    "During the long winter", "On the first warm day of spring", "After the harvest", "Before breakfast",
    "In the middle of the night",
)  # fmt: skip
_ADJECTIVES = (
    "calm", "noisy", "bright", "cold", "gentle", "strange", "peaceful", "busy", "golden", "grey", "windy", "pleasant",
)  # fmt: skip
_NOUNS = (
    "weather", "street", "kitchen", "valley", "festival", "meadow", "lake", "workshop", "road", "house", "garden",
)  # fmt: skip

CITIES: tuple[str, ...] = (
    "Lisbon", "Oslo", "Nairobi", "Lima", "Hanoi", "Quito", "Dublin", "Cairo", "Vienna", "Santiago", "Helsinki",
    "Manila", "Warsaw", "Havana", "Athens", "Bogota", "Prague", "Dakar", "Toronto", "Seoul", "Madrid", "Tunis",
    "Zagreb", "Montevideo", "Budapest", "Jakarta", "Accra", "Reykjavik", "Lyon", "Kyoto",
)  # fmt: skip

# -- prompt texts -------------------------------------------------------------------------------------

_PASSKEY_CHAT = ("There is a pass key hidden in the text below. Remember it.\n\n", "{doc}",
                 "\n\nWhat is the pass key? Answer with the number only.")
_PASSKEY_RAW = ("There is an important piece of information hidden inside a lot of irrelevant text. Find it and "
                "memorize it. I will quiz you about the important information there.\n\n", "{doc}",
                "\n\nWhat is the pass key? The pass key is")
_NEEDLE_CHAT = ("Some special magic numbers are hidden in the text below. Remember them.\n\n", "{doc}",
                "\n\nWhat is the special magic number for {key}? Answer with the number only.")
_NEEDLE_RAW = ("Some special magic numbers are hidden within the following text. Make sure to memorize them. "
               "I will quiz you about the numbers afterwards.\n\n", "{doc}",
               "\n\nWhat is the special magic number for {key} mentioned in the text? "
               "The special magic number for {key} mentioned in the text is")
_VARTRACK_CHAT = ("Memorize and track the chain of variable assignments hidden in the text below.\n\n", "{doc}",
                  "\n\nQuestion: Find all variables that are assigned the value {key} in the text above. "
                  "Answer with the variable names only, separated by commas.")
_VARTRACK_RAW = ("Memorize and track the chain of variable assignments hidden in the following text.\n\n", "{doc}",
                 "\n\nQuestion: Find all variables that are assigned the value {key} in the text above. "
                 "Answer: According to the chain of variable assignments in the text above, {n} variables are "
                 "assigned the value {key}, they are:")


_FACTS_CHAT = ("Read the document below. Remember the facts it states.\n\n", "{doc}",
               "\n\n{question} Answer with the {what} only.")
_FACTS_RAW = ("Read the document below. Remember the facts it states.\n\n", "{doc}", "\n\n{lead}")
FACT_KINDS: tuple[str, ...] = ("number", "date", "name")
_FIRST_NAMES = (
    "Mariana", "Tobias", "Ingrid", "Rafael", "Annika", "Dmitri", "Leonora", "Kwame", "Svetlana", "Matteo",
    "Ayesha", "Florian", "Noemi", "Bartosz", "Yuki", "Emeka",
)  # fmt: skip
_LAST_NAMES = (
    "Kovacic", "Lindqvist", "Okonkwo", "Ferreira", "Halvorsen", "Takahashi", "Marchetti", "Novak", "Abernathy",
    "Castellanos", "Petrosyan", "Vasquez", "Brennan", "Szabo", "Oyelaran", "Weidemann",
)  # fmt: skip
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December")
# (statement, chat question, raw lead-in, what the answer is) per fact kind; {v} is the value
_FACT_TEXTS = {
    "number": ("The maintenance log records that exactly {v} requests were served on the first day.",
               "According to the maintenance log, how many requests were served on the first day?",
               "According to the maintenance log, the number of requests served on the first day was", "number"),
    "date": ("The final review of this documentation took place on {v}.",
             "On which date did the final review of this documentation take place?",
             "The final review of this documentation took place on", "date"),
    "name": ("The person responsible for the final review of this documentation was {v}.",
             "Who was responsible for the final review of this documentation?",
             "The person responsible for the final review of this documentation was", "name"),
}


# -- samples -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskSample:
    """One generated prompt and its expected answer.

    Attributes:
        task: one of :data:`TASKS`.
        prompt: the user message (``mode="chat"``) or the completion prompt (``mode="raw"``).
        answer: the expected answer: the digits for passkey/needle/multikey, the comma-separated
            variable names for vartrack.
        depth: where the (first) needle sits, as a fraction of the document.
        n_tokens_target: the length asked for, in tokens.
        seed: the seed the content was drawn from.
        mode: "chat" or "raw".
        n_tokens: the prompt's length as the generator's tokenizer counted it.
        answers: every string the output must contain (one for the digit tasks, each variable name
            for vartrack).
    """

    task: str
    prompt: str
    answer: str
    depth: float
    n_tokens_target: int
    seed: int
    mode: str = "chat"
    n_tokens: int = 0
    answers: tuple[str, ...] = field(default=())

    def messages(self) -> list[dict[str, str]]:
        """The ``messages`` for ``create_chat_completion``: one user message holding the prompt."""
        if self.mode != "chat":
            raise ValueError(f"mode: messages() needs a chat sample, this one is {self.mode!r}")
        return [{"role": "user", "content": self.prompt}]


def score(sample: TaskSample, output_text: str) -> bool:
    """Whether the output answers the sample correctly.

    Digit tasks: the answer's number appears in the output as a whole number (no digit right
    before or after it; thousands separators such as ``12,345`` are accepted). vartrack: every
    expected variable name appears as a word (case-insensitive). facts: every part of the answer
    (the number; the day, month and year; the first and last name) appears, numbers as whole
    numbers and words as words (case-insensitive).
    """
    if not isinstance(output_text, str):
        raise ValueError(f"output_text: expected a str, got {type(output_text).__name__}")
    expected = sample.answers or (sample.answer,)
    if sample.task == "facts":  # numbers as numbers (separators allowed), words as words, any case
        text = re.sub(r"(?<=\d)[,_ ](?=\d{3}(?!\d))", "", output_text)
        return all(re.search(rf"(?<!\d){re.escape(a)}(?!\d)", text) if a.isdigit()
                   else re.search(rf"(?<![A-Za-z]){re.escape(a)}(?![A-Za-z])", text, re.IGNORECASE)
                   for a in expected)
    if sample.task == "vartrack":
        return all(re.search(rf"(?<![A-Za-z]){re.escape(name)}(?![A-Za-z])", output_text, re.IGNORECASE)
                   for name in expected)
    text = re.sub(r"(?<=\d)[,_ ](?=\d{3}(?!\d))", "", output_text)
    return all(re.search(rf"(?<!\d){re.escape(a)}(?!\d)", text) for a in expected)


# -- argument checks and token counting ------------------------------------------------------------------


def _token_counter(tokenizer: Tokenizer) -> Callable[[str], int]:
    """``text -> number of tokens`` for a callable tokenizer or a llama-cpp-python ``Llama``."""
    tokenize = getattr(tokenizer, "tokenize", None)
    if callable(tokenize):
        return lambda text: len(tokenize(text.encode("utf-8"), add_bos=True))
    if callable(tokenizer):
        return lambda text: len(tokenizer(text))
    raise ValueError(f"tokenizer: expected a callable str -> tokens or an object with tokenize(), "
                     f"got {type(tokenizer).__name__}")


def _check_common(n_tokens: Any, depth: Any, seed: Any, mode: Any) -> None:
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 1:
        raise ValueError(f"n_tokens: expected a positive int, got {n_tokens!r}")
    if isinstance(depth, bool) or not isinstance(depth, (int, float)) or not 0.0 <= float(depth) <= 1.0:
        raise ValueError(f"depth: expected a fraction in [0, 1], got {depth!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed: expected an int, got {seed!r}")
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {', '.join(MODES)}, got {mode!r}")


def _rng(task: str, seed: int, stream: str) -> random.Random:
    """An independent, reproducible random stream per (task, seed, purpose) (str seeds are hashed with SHA-512)."""
    return random.Random(f"adakv-tasks/{task}/{seed}/{stream}")


# -- filler --------------------------------------------------------------------------------------------


class _Filler:
    """A deterministic, endless sequence of filler sentences, materialised on demand."""

    def __init__(self, make: Callable[[int], str]) -> None:
        self._make = make
        self._items: list[str] = []

    def take(self, n: int) -> list[str]:
        while len(self._items) < n:
            self._items.append(self._make(len(self._items)))
        return self._items[:n]


def _passkey_filler() -> _Filler:
    return _Filler(lambda i: PASSKEY_FILLER[i % len(PASSKEY_FILLER)])


def _varied_filler(rng: random.Random) -> _Filler:
    """Varied sentences from small word lists; no digits, so the hidden numbers stay unique."""

    def make(_: int) -> str:
        kind = rng.randrange(5)
        subj, verb, obj, place = rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS), rng.choice(_PLACES)
        if kind == 0:
            s = f"{subj} {verb} {obj} {place}."
        elif kind == 1:
            s = f"{rng.choice(_TIMES)}, {subj} {verb} {obj}."
        elif kind == 2:
            s = f"The {rng.choice(_NOUNS)} was {rng.choice(_ADJECTIVES)} and {rng.choice(_ADJECTIVES)} {place}."
        elif kind == 3:
            s = f"Everyone agreed that {subj} had {verb} {obj} {place}."
        else:
            s = f"{subj} said that the {rng.choice(_NOUNS)} looked {rng.choice(_ADJECTIVES)} that day."
        return s[0].upper() + s[1:]

    return _Filler(make)


# -- assembly ------------------------------------------------------------------------------------------


def _document(sentences: list[str], inserts: Sequence[tuple[float, str]]) -> str:
    """Filler sentences with each insert placed after ``round(depth * len(sentences))`` of them (stable order)."""
    n = len(sentences)
    slots: dict[int, list[str]] = {}
    for d, text in inserts:
        slots.setdefault(int(math.floor(d * n + 0.5)), []).append(text)
    out: list[str] = []
    for i in range(n + 1):
        out.extend(slots.get(i, ()))
        if i < n:
            out.append(sentences[i])
    return " ".join(out)


def _fit(build: Callable[[int], str], count: Callable[[str], int], target: int, param: str = "n_tokens") -> str:
    """The ``build(n)`` (n filler sentences) whose token count is closest to target.

    Counts grow with n; a doubling search finds an upper bound, a binary search the crossing.
    """
    base = count(build(0))
    if base >= target:
        raise ValueError(f"{param}: {target} tokens is too short for this task's question and needles "
                         f"(they alone take {base} tokens)")
    hi = 8
    while count(build(hi)) < target:
        hi *= 2
    lo = 0  # count(build(lo)) < target <= count(build(hi))
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if count(build(mid)) < target:
            lo = mid
        else:
            hi = mid
    a, b = build(lo), build(hi)
    return a if target - count(a) <= count(b) - target else b


def _sample(task: str, parts: tuple[str, str, str], fmt: dict[str, Any], filler: _Filler,
            inserts: Sequence[tuple[float, str]], count: Callable[[str], int], n_tokens: int, depth: float,
            seed: int, mode: str, answers: tuple[str, ...]) -> TaskSample:
    head, _, tail = parts
    head, tail = head.format(**fmt), tail.format(**fmt)
    prompt = _fit(lambda n: head + _document(filler.take(n), inserts) + tail, count, n_tokens)
    return TaskSample(task=task, prompt=prompt, answer=", ".join(answers), depth=float(depth),
                      n_tokens_target=n_tokens, seed=seed, mode=mode, n_tokens=count(prompt), answers=answers)


def _number(rng: random.Random, digits: int) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10**digits))


# -- the tasks -----------------------------------------------------------------------------------------


def passkey(tokenizer: Tokenizer, n_tokens: int, depth: float, seed: int, *, mode: str = "chat") -> TaskSample:
    """A 5-digit pass key ("The pass key is 12345. Remember it.") in the classic repeated filler."""
    _check_common(n_tokens, depth, seed, mode)
    key = _number(_rng("passkey", seed, "answer"), 5)
    parts = _PASSKEY_CHAT if mode == "chat" else _PASSKEY_RAW
    needle = f"The pass key is {key}. Remember it."
    return _sample("passkey", parts, {}, _passkey_filler(), [(depth, needle)], _token_counter(tokenizer),
                   n_tokens, depth, seed, mode, (key,))


def needle(tokenizer: Tokenizer, n_tokens: int, depth: float, seed: int, *, mode: str = "chat") -> TaskSample:
    """One "special magic number" (7 digits) for a city, hidden in varied filler."""
    return _magic_numbers("needle", tokenizer, n_tokens, depth, seed, mode, 1)


def multikey(tokenizer: Tokenizer, n_tokens: int, depth: float, seed: int, *, mode: str = "chat",
             n_keys: int = 4) -> TaskSample:
    """n_keys magic-number needles for different cities; the question asks for the one at ``depth``.

    The other needles (distractors, with other cities and numbers) sit at random depths.
    """
    if isinstance(n_keys, bool) or not isinstance(n_keys, int) or not 1 <= n_keys <= len(CITIES):
        raise ValueError(f"n_keys: expected an int in [1, {len(CITIES)}], got {n_keys!r}")
    return _magic_numbers("multikey", tokenizer, n_tokens, depth, seed, mode, n_keys)


def _magic_numbers(task: str, tokenizer: Tokenizer, n_tokens: int, depth: float, seed: int, mode: str,
                   n_keys: int) -> TaskSample:
    _check_common(n_tokens, depth, seed, mode)
    rng = _rng(task, seed, "answer")
    cities = rng.sample(CITIES, n_keys)
    numbers: list[str] = []
    while len(numbers) < n_keys:
        v = _number(rng, 7)
        if v not in numbers:
            numbers.append(v)
    inserts = [(depth, f"The special magic number for {cities[0]} is {numbers[0]}.")]
    inserts += [(rng.random(), f"The special magic number for {c} is {v}.") for c, v in zip(cities[1:], numbers[1:])]
    parts = _NEEDLE_CHAT if mode == "chat" else _NEEDLE_RAW
    return _sample(task, parts, {"key": cities[0]}, _varied_filler(_rng(task, seed, "filler")), inserts,
                   _token_counter(tokenizer), n_tokens, depth, seed, mode, (numbers[0],))


def _var_names(rng: random.Random, n: int) -> list[str]:
    names: list[str] = []
    while len(names) < n:
        name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if name not in names:
            names.append(name)
    return names


def vartrack(tokenizer: Tokenizer, n_tokens: int, depth: float, seed: int, *, mode: str = "chat",
             n_hops: int = 2, n_distractors: int = 1) -> TaskSample:
    """Variable tracking: ``VAR ABCDE = 12345.``, then n_hops ``VAR X = VAR Y.`` links, in filler.

    The chain starts at ``depth``; its links follow in order, spread over the rest of the document.
    n_distractors other chains (same length, other names and values) sit at random depths. The
    answer lists the n_hops + 1 names that hold the value.
    """
    _check_common(n_tokens, depth, seed, mode)
    if isinstance(n_hops, bool) or not isinstance(n_hops, int) or not 0 <= n_hops <= 10:
        raise ValueError(f"n_hops: expected an int in [0, 10], got {n_hops!r}")
    if isinstance(n_distractors, bool) or not isinstance(n_distractors, int) or not 0 <= n_distractors <= 5:
        raise ValueError(f"n_distractors: expected an int in [0, 5], got {n_distractors!r}")
    rng = _rng("vartrack", seed, "answer")
    n_vars = n_hops + 1
    names = _var_names(rng, n_vars * (1 + n_distractors))
    values: list[str] = []
    while len(values) < 1 + n_distractors:
        v = _number(rng, 5)
        if v not in values:
            values.append(v)
    inserts: list[tuple[float, str]] = []
    for c in range(1 + n_distractors):
        chain = names[c * n_vars : (c + 1) * n_vars]
        if c == 0:
            depths = [depth + (1.0 - depth) * i / n_vars for i in range(n_vars)]
        else:
            depths = sorted(rng.random() for _ in range(n_vars))
        for i, (d, name) in enumerate(zip(depths, chain)):
            inserts.append((d, f"VAR {name} = {values[c] if i == 0 else 'VAR ' + chain[i - 1]}."))
    parts = _VARTRACK_CHAT if mode == "chat" else _VARTRACK_RAW
    return _sample("vartrack", parts, {"key": values[0], "n": n_vars}, _varied_filler(_rng("vartrack", seed, "filler")),
                   inserts, _token_counter(tokenizer), n_tokens, depth, seed, mode, tuple(names[:n_vars]))


def _prose_filler(rng: random.Random) -> _Filler:
    """Sentences of the standard library's documentation (:mod:`adakv_local.eval.texts`), modules in a
    seeded order, every sentence on one line; digits are removed so that the fact's number is unique."""
    from .texts import documents

    texts = [t for _, t in documents(min_chars=4000)]
    if not texts:
        raise ValueError("facts: this Python has no standard-library documentation to build a document from")
    rng.shuffle(texts)
    sentences = [x for t in texts for x in re.split(r"(?<=[.!?])\s+", re.sub(r"\s+", " ", re.sub(r"\d", "", t)))
                 if len(x) > 20]
    return _Filler(lambda i: sentences[i % len(sentences)])


def facts(tokenizer: Tokenizer, n_tokens: int, depth: float, seed: int, *, mode: str = "chat",
          kind: str | None = None) -> TaskSample:
    """A number, a date or a name (``kind``; None: the seed picks one) stated once in natural prose."""
    _check_common(n_tokens, depth, seed, mode)
    rng = _rng("facts", seed, "answer")
    picked = rng.choice(FACT_KINDS)
    kind = picked if kind is None else kind
    if kind not in FACT_KINDS:
        raise ValueError(f"kind: expected None or one of {', '.join(FACT_KINDS)}, got {kind!r}")
    if kind == "number":
        value = _number(rng, 5)
        answers: tuple[str, ...] = (value,)
    elif kind == "date":
        day, month, year = rng.randrange(1, 29), rng.choice(_MONTHS), rng.randrange(1950, 2030)
        value, answers = f"{day} {month} {year}", (str(day), month, str(year))
    else:
        first, last = rng.choice(_FIRST_NAMES), rng.choice(_LAST_NAMES)
        value, answers = f"{first} {last}", (first, last)
    statement, question, lead, what = _FACT_TEXTS[kind]
    parts = _FACTS_CHAT if mode == "chat" else _FACTS_RAW
    fmt = {"question": question, "what": what, "lead": lead}
    sample = _sample("facts", parts, fmt, _prose_filler(_rng("facts", seed, "filler")),
                     [(depth, statement.format(v=value))], _token_counter(tokenizer), n_tokens, depth, seed, mode,
                     answers)
    return sample


GENERATORS: MappingProxyType[str, Callable[..., TaskSample]] = MappingProxyType(
    {"passkey": passkey, "needle": needle, "multikey": multikey, "vartrack": vartrack, "facts": facts}
)


def make_sample(task: str, tokenizer: Tokenizer, n_tokens: int, depth: float, seed: int, *, mode: str = "chat",
                **options: Any) -> TaskSample:
    """The sample of the named task (options: n_keys for multikey; n_hops, n_distractors for vartrack;
    kind for facts)."""
    if task not in GENERATORS:
        raise ValueError(f"task: expected one of {', '.join(TASKS)}, got {task!r}")
    return GENERATORS[task](tokenizer, n_tokens, depth, seed, mode=mode, **options)


# -- running -------------------------------------------------------------------------------------------


def _check_list(name: str, values: Any, ok: Callable[[Any], bool], what: str) -> list[Any]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise ValueError(f"{name}: expected a non-empty list of {what}, got {values!r}")
    out = list(values)
    if not out:
        raise ValueError(f"{name}: expected a non-empty list of {what}, got an empty one")
    for v in out:
        if not ok(v):
            raise ValueError(f"{name}: expected {what}, got {v!r}")
    return out


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _generate(llm: Any, sample: TaskSample, max_tokens: int) -> tuple[str, int]:
    """Greedy answer to one sample, from a fresh evaluation of its whole prompt; (text, prompt tokens)."""
    llm.reset()  # no prefix reuse: every sample is evaluated (and, with a budget, compressed) from scratch
    if sample.mode == "chat":
        r = llm.create_chat_completion(messages=sample.messages(), max_tokens=max_tokens, temperature=0.0,
                                       top_k=1, seed=0)
        text = r["choices"][0]["message"]["content"] or ""
    else:
        r = llm.create_completion(sample.prompt, max_tokens=max_tokens, temperature=0.0, top_k=1, seed=0)
        text = r["choices"][0]["text"]
    return text, int(r["usage"]["prompt_tokens"])


def run_tasks(model_path: str, *, tasks: Sequence[str], lengths: Sequence[int], depths: Sequence[float],
              methods_budgets: Sequence[tuple[str, int | None]], mode: str = "chat", n_samples: int = 1,
              seed: int = 0, n_threads: int = 2, max_tokens: int = 16, window: int | None = None,
              kernel: int | None = None, options: dict[str, Any] | None = None,
              n_gpu_layers: int = 0, progress: Progress | None = None) -> list[dict[str, Any]]:
    """Every (task, length, depth, sample) answered under every (method, budget); one record per answer.

    One ``adakv_local.Llama`` is loaded per (method, budget) and reused for all samples; each
    sample is evaluated from scratch (``reset()``) and answered greedily.

    Args:
        model_path: a GGUF file.
        tasks: names from :data:`TASKS`.
        lengths: prompt lengths in tokens (counted with the model's tokenizer).
        depths: needle depths in [0, 1].
        methods_budgets: ``(method, budget)`` pairs; budget None is the full cache (the method is
            then only a label, e.g. ``("full", None)``), an int the cells per KV head (window included).
        mode: "chat" (``create_chat_completion``) or "raw" (``create_completion``).
        n_samples: samples per (task, length, depth); sample i uses seed ``seed + i``.
        seed: first seed.
        n_threads: CPU threads (prompt and generation).
        max_tokens: tokens generated per answer.
        window: ``adakv_window`` (None: the library default).
        kernel: ``adakv_kernel``, the score pooling width (None: the library default).
        options: more eviction options for every budgeted run, by AdaKVConfig name without the
            ``adakv_`` prefix (``{"pooling": "max-fill"}``); None: the library defaults.
        n_gpu_layers: layers offloaded to a GPU build.
        progress: called as ``progress(done, total, record)`` after each answer.

    Returns:
        Dicts with task, method, budget, length, depth, seed, correct, output, prompt_tokens, mode
        and seconds (wall time of the answer, prompt included).
    """
    tasks = _check_list("tasks", tasks, lambda t: t in TASKS, f"task names ({', '.join(TASKS)})")
    lengths = _check_list("lengths", lengths, lambda n: _is_int(n) and n > 0, "positive ints")
    depths = _check_list("depths", depths, lambda d: isinstance(d, (int, float)) and not isinstance(d, bool)
                         and 0.0 <= d <= 1.0, "fractions in [0, 1]")
    methods_budgets = _check_list(
        "methods_budgets", methods_budgets,
        lambda mb: isinstance(mb, (tuple, list)) and len(mb) == 2 and isinstance(mb[0], str)
        and (mb[1] is None or (_is_int(mb[1]) and mb[1] > 0)),
        "(method, budget) pairs with budget None or a positive int")
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {', '.join(MODES)}, got {mode!r}")
    for name, value, low in (("n_samples", n_samples, 1), ("n_threads", n_threads, 1), ("max_tokens", max_tokens, 1),
                             ("n_gpu_layers", n_gpu_layers, -1)):
        if not _is_int(value) or value < low:
            raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
    if not _is_int(seed):
        raise ValueError(f"seed: expected an int, got {seed!r}")
    if window is not None and (not _is_int(window) or window < 1):
        raise ValueError(f"window: expected None or a positive int, got {window!r}")

    from ..config import AdaKVConfig

    for method, budget in methods_budgets:
        if budget is not None:
            try:
                AdaKVConfig.from_llama_kwargs({"adakv_budget": budget, "adakv_method": method, "adakv_window": window,
                                               **{f"adakv_{k}": v for k, v in (options or {}).items()}})
            except ValueError as e:
                raise ValueError(f"methods_budgets: ({method!r}, {budget}): {e}") from None

    from ..llama import Llama  # the native library is loaded only when a model is run

    vocab = Llama(model_path=str(model_path), vocab_only=True, verbose=False)
    try:
        samples = [make_sample(t, vocab, n, d, seed + i, mode=mode)
                   for t in tasks for n in lengths for d in depths for i in range(n_samples)]
    finally:
        vocab.close()
    # the chat template adds a few tokens (SmolLM2 adds a default system prompt): leave room for them
    margin = 128 if mode == "chat" else 8
    n_ctx = -(-(max(s.n_tokens for s in samples) + margin + max_tokens) // 256) * 256

    total = len(samples) * len(methods_budgets)
    records: list[dict[str, Any]] = []
    for method, budget in methods_budgets:
        kw: dict[str, Any] = {}
        if budget is not None:
            kw = {"adakv_budget": budget, "adakv_method": method}
            if window is not None:
                kw["adakv_window"] = window
            if kernel is not None:
                kw["adakv_kernel"] = kernel
            kw.update({f"adakv_{k}": v for k, v in (options or {}).items()})
        llm = Llama(model_path=str(model_path), n_ctx=n_ctx, n_batch=512, n_threads=n_threads,
                    n_threads_batch=n_threads, n_gpu_layers=n_gpu_layers, flash_attn=True, verbose=False, **kw)
        try:
            for s in samples:
                t0 = time.perf_counter()
                text, n_prompt = _generate(llm, s, max_tokens)
                rec = {"task": s.task, "method": method, "budget": budget, "length": s.n_tokens_target,
                       "depth": s.depth, "seed": s.seed, "correct": score(s, text), "output": text,
                       "prompt_tokens": n_prompt, "mode": mode, "seconds": time.perf_counter() - t0}
                st = llm.adakv_stats if budget is not None else None  # the answer's prompt's record
                # what the answer cost in memory: the cells held after the prompt (R, the compacted
                # block, when it was compressed) and their K/V bytes
                rec["footprint"] = st.cells_after if st is not None else n_prompt
                rec["kv_bytes"] = st.kv_bytes if st is not None else None
                records.append(rec)
                if progress is not None:
                    progress(len(records), total, rec)
        finally:
            llm.close()
    return records


def summarize(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Accuracy per (task, method, budget, length), in first-seen order.

    Returns:
        Dicts with task, method, budget, length, n (answers), correct (count) and accuracy (0 to 1).
    """
    groups: dict[tuple[Any, ...], list[int]] = {}
    for r in records:
        try:
            key = (r["task"], r["method"], r["budget"], r["length"])
            ok = bool(r["correct"])
        except (KeyError, TypeError) as e:
            raise ValueError(f"records: each record needs task, method, budget, length and correct ({e})") from None
        g = groups.setdefault(key, [0, 0])
        g[0] += 1
        g[1] += ok
    return [{"task": t, "method": m, "budget": b, "length": n, "n": c[0], "correct": c[1], "accuracy": c[1] / c[0]}
            for (t, m, b, n), c in groups.items()]
