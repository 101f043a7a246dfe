"""The measuring harness: fidelity to the full cache, instructions over real documents, long-context
tasks, chunked prefill and the speed bench (the commands behind docs/RESULTS.md).

Layer: above the engine (``adakv_local.Llama``, the cache handle, config, policies), below the CLI.
Modules here import the engine and each other, never :mod:`adakv_local.cli`.

* :mod:`.fidelity` - the metrics (KL, top-1 agreement, attention L1) and teacher forcing;
* :mod:`.evaluate` - ``eval fidelity`` on raw text, and the plots;
* :mod:`.instruct` - ``eval fidelity --instructions``: answers after real documents (:mod:`.corpus`);
* :mod:`.tasks` - ``eval tasks``: pass-key, needle, facts ... over standard-library prose (:mod:`.texts`);
* :mod:`.chunked` - ``eval chunked``: chunked prefill against one-shot eviction;
* :mod:`.bench` - ``bench``: speed and memory, full cache against eviction in one run.
"""
