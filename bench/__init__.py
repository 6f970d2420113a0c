"""bench/: the benchmark suite (`make bench`), separate from the tests.

Each module ``bench/<part>.py`` exposes ``run(quick: bool = False) -> dict[str, float | str]``
returning self-explaining figures. ``python -m bench`` runs them, repeats each, reports the
median with its spread, and writes ``bench/results.md`` and ``bench/results.json``.
"""
