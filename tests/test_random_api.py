"""Seeded randomized test of adakv_local.Llama's public API (the cases and the oracle are in
tests/randomized.py; what they cover and how long they take: docs/RANDOMIZED.md).

The default run has 32 cases (seeds 0-29, and seeds 0 and 1 on the 16-layer x 8-KV-head model with the
per-head fallback attention). The slow run has 500 more (seeds 1000-1499; change the
count with ADAKV_RANDOM_CASES): ``python -m pytest tests/test_random_api.py -m slow``. Run given
seeds only: ``ADAKV_RANDOM_SEEDS=12,345,7:deep python -m pytest tests/test_random_api.py``. A failure
prints the seed, the configuration, the steps so far and the command that replays the case.
"""

from __future__ import annotations

import os

import pytest
from randomized import Case, CheckFailed, random_config, run_in_subprocess, write_models

DEFAULT_SEEDS = [*range(30), "0:deep", "1:deep"]  # and two draws on 16 layers x 8 KV heads with the fallback
SLOW_FIRST = 1000


def _slow_selected(config: pytest.Config) -> bool:
    expr = config.getoption("markexpr", "") or ""
    return os.environ.get("ADAKV_RANDOM_SLOW") == "1" or ("slow" in expr and "not slow" not in expr)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "seed" not in metafunc.fixturenames:
        return
    if os.environ.get("ADAKV_RANDOM_SEEDS"):
        keys = [k.strip() for k in os.environ["ADAKV_RANDOM_SEEDS"].split(",") if k.strip()]
        seeds = [pytest.param(k, id=f"seed_{k.replace(':', '_')}") for k in keys]
    else:
        seeds = [pytest.param(s, id=f"seed_{str(s).replace(':', '_')}") for s in DEFAULT_SEEDS]
        if _slow_selected(metafunc.config):
            n = int(os.environ.get("ADAKV_RANDOM_CASES", "500"))
            seeds += [pytest.param(s, id=f"seed_{s}", marks=pytest.mark.slow)
                      for s in range(SLOW_FIRST, SLOW_FIRST + n)]  # fmt: skip
    metafunc.parametrize("seed", seeds)


@pytest.fixture(scope="session")
def random_models(tmp_path_factory):
    return write_models(tmp_path_factory.mktemp("random-models"))


def test_random_case(seed, random_models):
    if random_config(seed).attn_path != "auto":
        # the per-head fallback or mask attention: a native abort must fail this case, not the whole run
        ok, out = run_in_subprocess(seed, random_models)
        if not ok:
            pytest.fail(out, pytrace=False)
        return
    failure = None
    try:
        Case(seed, random_models).run()
    except CheckFailed as e:
        failure = str(e)
    if failure is not None:
        pytest.fail(failure, pytrace=False)
