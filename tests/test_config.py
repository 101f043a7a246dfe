"""AdaKVConfig, the single source of the eviction options: ranges, messages, help text (no model needed)."""

from __future__ import annotations

import argparse
import math

import numpy as np
import pytest

from adakv_local.cli.common import budget_arg, config_from_flags
from adakv_local.config import OPTIONS, AdaKVConfig, ConfigError


@pytest.mark.parametrize("budget, expected", [
    (1000, 1000),
    (1e3, 1000),
    (1000.0, 1000),
    (np.int64(300), 300),
    (np.float64(64.0), 64),
    (0.25, 0.25),  # a fraction stays a fraction
])
def test_whole_budgets_become_ints(budget, expected):
    cfg = AdaKVConfig(budget=budget)
    assert cfg.budget == expected and type(cfg.budget) is type(expected), (budget, cfg.budget)
    if isinstance(expected, int):
        assert cfg.cells_for(10_000) == expected


@pytest.mark.parametrize("budget", [0, -5, 1, 31, 2.5, 1.0, 31.0, "256", True, None, math.nan, math.inf, -0.5])
def test_bad_budgets_name_the_real_range(budget):
    with pytest.raises(ConfigError) as e:
        AdaKVConfig(budget=budget)
    msg = str(e.value)
    assert e.value.option == "budget"
    # the window is the real lower bound, with its number; fractions are the other choice; the value is echoed
    assert "integer >= the window (32" in msg and "fraction of the prompt in (0, 1)" in msg, msg
    assert f"got {budget!r}" in msg or f"got {int(budget)}" in msg, msg


def test_budget_bound_follows_the_window_and_method():
    assert AdaKVConfig(budget=16, window=16).budget == 16
    with pytest.raises(ConfigError, match=r"integer >= the window \(16, always kept\).*got 15"):
        AdaKVConfig(budget=15, window=16)
    assert AdaKVConfig(budget=1, method="full").budget == 1  # full keeps every cell: no window bound
    with pytest.raises(ConfigError, match=r"integer >= 1 or a fraction"):
        AdaKVConfig(budget=0, method="full")


def test_non_integral_budget_says_what_is_allowed():
    with pytest.raises(ConfigError, match=r"got 2\.5, which is neither"):
        AdaKVConfig(budget=2.5)


def test_python_keywords_and_cli_flags_spell_the_option_their_way():
    with pytest.raises(ConfigError, match=r"^adakv_budget must be an integer >= the window \(32"):
        AdaKVConfig.from_llama_kwargs({"adakv_budget": 1})
    cfg = AdaKVConfig.from_llama_kwargs({"adakv_budget": 1e3, "adakv_window": None})
    assert cfg is not None and cfg.budget == 1000
    args = argparse.Namespace(**{f"adakv_{o.name}": None for o in OPTIONS})
    args.adakv_budget = 4
    with pytest.raises(ConfigError, match=r"^--budget must be an integer >= the window \(32"):
        config_from_flags(args)


@pytest.mark.parametrize("text, expected", [("256", 256), ("1e3", 1000), ("1000.0", 1000), ("0.1", 0.1),
                                            ("2.5", 2.5)])
def test_budget_flag_parses_whole_numbers_as_ints(text, expected):
    value = budget_arg(text)
    assert value == expected and type(value) is type(expected)


def test_budget_flag_rejects_words():
    with pytest.raises(argparse.ArgumentTypeError, match="not a number"):
        budget_arg("lots")


def test_budget_help_states_the_window_bound():
    help_text = next(o.help for o in OPTIONS if o.name == "budget")
    assert ">= the window" in help_text and "1e3" in help_text and "(0, 1)" in help_text


def test_numpy_integers_are_accepted_for_integer_options():
    cfg = AdaKVConfig(budget=64, window=np.int32(16), kernel=np.int64(5), sinks=np.int16(4))
    assert (cfg.window, cfg.kernel, cfg.sinks) == (16, 5, 4)
    assert all(type(v) is int for v in (cfg.window, cfg.kernel, cfg.sinks))
    with pytest.raises(ConfigError, match="window"):
        AdaKVConfig(budget=64, window=16.0)  # only the budget turns whole floats into ints


def test_llama_kwargs_round_trip():
    """Every option reaches Llama's keywords (the CLI and eval chunked build their Llama from them)."""
    cfg = AdaKVConfig(budget=96, method="snapkv", window=16, kernel=15, pooling="max2", spans="words", span_share=0.3,
                      gqa="max", alpha=0.5, max_ratio=1.5, sinks=4, chunk=512)
    kw = cfg.llama_kwargs()
    assert set(kw) == {f"adakv_{o.name}" for o in OPTIONS}
    assert AdaKVConfig.from_llama_kwargs(kw) == cfg
