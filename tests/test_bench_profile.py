"""bench/profile.py: py-spy's collapsed stacks charged to the library that was running."""

from __future__ import annotations

from pathlib import Path

from bench.profile import ROOT, summary

SITE = "/x/.venv/lib/python3.11/site-packages"
STDLIB = "/usr/lib/python3.11"


def test_each_sample_goes_to_the_innermost_library_frame(tmp_path: Path) -> None:
    stacks = tmp_path / "p.txt"
    stacks.write_text(
        # aiokafka called from our code: aiokafka's, 60 samples
        f"main ({ROOT}/streams/app.py:10);fetch ({SITE}/aiokafka/fetcher.py:5) 60\n"
        # fastavro under pydantic-free serde code: fastavro's, even below a stdlib frame
        f"enc ({ROOT}/schemas/serde.py:1);w ({SITE}/fastavro/write.py:3);"
        f"write ({STDLIB}/io.py:9) 30\n"
        # only the event loop on the stack: the standard library's
        f"run ({STDLIB}/asyncio/base_events.py:1);select ({STDLIB}/selectors.py:2) 10\n"
        "garbage line without a count\n"
    )
    line = summary(stacks, cpu_ms_per_task=2.0)
    assert line.startswith("100 samples")
    assert "aiokafka 60% = 1.20 ms" in line
    assert "fastavro 30% = 0.60 ms" in line
    assert "python stdlib 10% = 0.20 ms" in line
    assert "hottest: fetch (fetcher.py) 60%" in line


def test_our_own_code_is_stormline_and_an_empty_profile_says_so(tmp_path: Path) -> None:
    stacks = tmp_path / "p.txt"
    stacks.write_text(f"route ({ROOT}/streams/router.py:3) 5\n")
    assert "stormline 100%" in summary(stacks)
    stacks.write_text("")
    assert summary(stacks) == "no samples"
