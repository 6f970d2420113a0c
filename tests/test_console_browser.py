"""The web console in a real headless browser (Debian's chromium, driven by Playwright)
against a whole running loop: simulator, router, a worker, evaluator, sink and trainer as real
processes (tests/loop.py) and `stormline api` serving /console/.

Every page loads and shows numbers that the loop made; the Overview's task count moves while
tasks flow; a page says why it is denied without a key and with a key that lacks the role;
a dead letter is replayed from the page. A screenshot of each page lands in
tests/output/console/<page>.png (git-ignored): look at them.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from confluent_kafka import Producer
from playwright.sync_api import Browser, Page, expect, sync_playwright

from stormline.api.models import Role
from stormline.schemas.catalog import TASKS
from stormline.settings import Settings
from tests.api_fixtures import auth, make_key, running_api
from tests.conftest import wait_until
from tests.loop import Loop

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]
SHOTS = Path(__file__).resolve().parent / "output" / "console"
CHROMIUM = "/usr/bin/chromium"
WAIT_MS = 60_000  # a page's first data (the store opens chDB on first use: seconds here)
DEMO_TYPES = ("math", "reverse", "sort", "upper")
N_TASKS = 80  # published at first; the Overview test publishes 40 more while it looks
ERRORS: dict[int, list[str]] = {}  # per page: uncaught JavaScript errors


@pytest.fixture(scope="module")
def loop(stack_settings: Settings, tmp_path_factory: Any) -> Iterator[Loop]:
    # The trainer updates (and publishes a checkpoint) after 50 experiences, not 100: the
    # Learning page gets its first checkpoint sooner.
    with Loop(
        stack_settings,
        tmp_path_factory.mktemp("console"),
        workers=1,
        sink=True,
        trainer=True,
        extra_env={"STORMLINE_TRAINER_BATCH_SIZE": "50"},
    ) as lp:
        yield lp


@pytest.fixture(scope="module")
def api(loop: Loop) -> Iterator[str]:
    with running_api(loop.s, loop.s.data_dir / "api.log") as url:
        yield url


@pytest.fixture(scope="module")
def keys(loop: Loop) -> dict[str, str]:
    return {
        "operator": make_key(loop.s, "default", [Role.OPERATE, Role.READ]),
        "submitter": make_key(loop.s, "default", [Role.SUBMIT]),
    }


@pytest.fixture(scope="module")
def flowing(loop: Loop, api: str, keys: dict[str, str]) -> Loop:
    """Tasks through the loop until the trainer has published a checkpoint (the Learning
    page's table), with three poison records on the tasks topic (dead letters)."""
    loop.publish(N_TASKS, seed=1)
    raw = Producer({"bootstrap.servers": loop.s.bootstrap_servers})
    for i in range(3):
        raw.produce(TASKS.name(loop.s), key=f"poison-{i}", value=os.urandom(40))
    assert raw.flush(10) == 0
    loop.wait_flowing(rewards=N_TASKS - 10, timeout=240)
    h = auth(keys["operator"])

    def checkpoint() -> bool:
        loop.tick()
        got = httpx.get(f"{api}/console/api/learning", headers=h, timeout=60).json()
        return bool(got["checkpoints"]) and bool(got["regret"])

    wait_until(checkpoint, 150, "a checkpoint in the analytics store", 2.0)
    return loop


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


def _page(browser: Browser, api: str, key: str | None) -> Page:
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors = ERRORS.setdefault(id(page), [])
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"{api}/console/")
    if key is not None:
        # Signing in as a person does: paste the key, press the button.
        page.fill("#api-key", key)
        page.click("#login button[type=submit]")
        page.wait_for_load_state()
    return page


def _shot(page: Page, name: str) -> None:
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)
    assert not ERRORS.get(id(page)), f"JavaScript errors on {name}: {ERRORS[id(page)]}"


def _number(page: Page, sel: str) -> float:
    text = page.locator(sel).inner_text().replace(",", "").rstrip("%")
    return float(text)


def test_denied_without_a_key_and_with_a_key_lacking_the_role(
    api: str, keys: dict[str, str], browser: Browser
) -> None:
    page = _page(browser, api, None)
    expect(page.locator("#error")).to_contain_text("Not signed in (401)", timeout=WAIT_MS)
    expect(page.locator("#who")).to_have_text("not signed in")
    _shot(page, "denied-no-key")
    page.fill("#api-key", "stl_0000000000000000_not-a-real-secret")
    page.click("#login button[type=submit]")
    expect(page.locator("#error")).to_contain_text("invalid or revoked API key", timeout=WAIT_MS)
    page.close()

    page = _page(browser, api, keys["submitter"])
    expect(page.locator("#who")).to_contain_text("roles: submit", timeout=WAIT_MS)
    err = page.locator("#error")
    expect(err).to_contain_text("Denied (403)", timeout=WAIT_MS)
    expect(err).to_contain_text("needs the 'operate' role; this key has: submit")
    _shot(page, "denied-wrong-role")
    page.goto(f"{api}/console/tasks.html")
    expect(page.locator("#error")).to_contain_text("needs the 'read' role", timeout=WAIT_MS)
    page.close()


def test_overview_is_live(flowing: Loop, api: str, keys: dict[str, str], browser: Browser) -> None:
    page = _page(browser, api, keys["operator"])
    expect(page.locator("#who")).to_contain_text("operate", timeout=WAIT_MS)
    total = page.locator("#tasks-total")
    expect(total).to_have_text(re.compile(r"^\d[\d,]*$"), timeout=WAIT_MS)
    before = _number(page, "#tasks-total")
    assert before >= N_TASKS + 3  # what this test published, poison included
    for seed in range(2, 6):  # tasks keep coming while the page is open
        flowing.publish(10, seed=seed)
        time.sleep(1)
    page.wait_for_function(
        "Number(document.querySelector('#tasks-total').textContent.replace(/,/g, ''))"
        f" >= {before + 40}",
        timeout=WAIT_MS,
    )
    # The rate is measured between the page's own samples: positive while tasks came in.
    page.wait_for_function(
        "parseFloat(document.querySelector('#tasks-rate').textContent) > 0", timeout=WAIT_MS
    )
    assert _number(page, "#rewards-total") >= N_TASKS - 10
    expect(page.locator("#success-rate")).to_have_text(re.compile(r"^\d+\.\d%$"))
    assert _number(page, "#dead-total") >= 3
    assert page.locator("#rates-chart svg path").count() >= 3
    lag = page.locator("#lag-table")
    expect(lag).to_contain_text(f"{flowing.s.topic_prefix}stormline-router")
    expect(lag).to_contain_text(f"{flowing.s.topic_prefix}stormline-workers")
    _shot(page, "overview")


def test_agents_show_health_estimates_and_share(
    flowing: Loop, api: str, keys: dict[str, str], browser: Browser
) -> None:
    page = _page(browser, api, keys["operator"])
    page.goto(f"{api}/console/agents.html")
    rows = page.locator("table.agents tbody tr")
    expect(rows).to_have_count(3, timeout=WAIT_MS)
    for i in range(3):
        expect(page.locator("table.agents")).to_contain_text(f"agent-{i}")
    expect(page.locator("table.agents")).to_contain_text("healthy")
    expect(page.locator("table.agents")).to_contain_text("closed")
    # Every agent served tasks: its attempts cell is a positive count.
    attempts = [int(rows.nth(i).locator("td").nth(6).inner_text()) for i in range(3)]
    assert sum(attempts) >= N_TASKS - 10, attempts
    # An interval per (task type, agent) the router holds an estimate for: the 4 demo types.
    dots = page.locator("#estimates svg.interval circle")
    expect(dots.first).to_be_visible(timeout=WAIT_MS)
    got = httpx.get(f"{api}/console/api/agents", headers=auth(keys["operator"]), timeout=60)
    n = len(got.json()["estimates"])
    assert n >= 4 and {e["task_type"] for e in got.json()["estimates"]} == set(DEMO_TYPES)
    expect(dots).to_have_count(n, timeout=WAIT_MS)
    assert page.locator("#share svg.line").count() == 4
    _shot(page, "agents")


def test_tasks_find_one_and_show_its_timeline(
    flowing: Loop, api: str, keys: dict[str, str], browser: Browser
) -> None:
    h = auth(keys["operator"])

    def done() -> str | None:
        got = httpx.get(f"{api}/console/api/tasks?limit=200", headers=h, timeout=60).json()
        return next((t["task_id"] for t in got["tasks"] if t["state"] == "succeeded"), None)

    task_id = wait_until(done, 60, "a succeeded task in the store", 1.0)
    task = next(t for t in flowing.tasks if t.task_id == task_id)
    page = _page(browser, api, keys["operator"])
    page.goto(f"{api}/console/tasks.html")
    expect(page.locator("#recent table tbody tr").first).to_be_visible(timeout=WAIT_MS)
    page.fill("#task-id", task_id)
    page.click("#find button")
    tl = page.locator("#timeline")
    expect(tl.locator("li.reward")).to_have_count(1, timeout=WAIT_MS)
    expect(tl.locator("li.submitted")).to_contain_text(task.prompt)
    expect(tl.locator("li.assigned")).to_contain_text("attempt 1")
    expect(tl.locator("li.trajectory .output")).not_to_be_empty()
    expect(page.locator("#task-status")).to_contain_text("succeeded")
    _shot(page, "tasks")
    page.fill("#task-id", "no-such-task")
    page.click("#find button")
    expect(page.locator("#task-error")).to_contain_text("404", timeout=WAIT_MS)


def test_topics_browse_decoded_messages(
    flowing: Loop, api: str, keys: dict[str, str], browser: Browser
) -> None:
    topic = TASKS.name(flowing.s)
    page = _page(browser, api, keys["operator"])
    page.goto(f"{api}/console/topics.html#topic={topic}")
    expect(page.locator("#topic-title")).to_contain_text("TaskSubmitted", timeout=WAIT_MS)
    rows = page.locator("table.messages tbody tr")
    expect(rows.first).to_be_visible(timeout=WAIT_MS)
    assert rows.count() >= 25  # limit 25 per partition, 4 partitions, 120+ tasks
    ids = {t.task_id for t in flowing.tasks}
    keys_shown = {rows.nth(i).locator("td").nth(2).inner_text() for i in range(rows.count())}
    assert keys_shown & ids, keys_shown
    first_id = next(iter(keys_shown & ids))
    expect(page.locator("table.messages")).to_contain_text(f'"task_id": "{first_id}"')
    # One partition from an offset: exactly the records asked for.
    page.select_option("#partition", "0")
    page.fill("#offset", "0")
    page.fill("#limit", "5")
    page.click("#browse button")
    expect(page.locator("table.messages tbody tr")).to_have_count(5, timeout=WAIT_MS)
    offsets = [
        page.locator("table.messages tbody tr").nth(i).locator("td").nth(1).inner_text()
        for i in range(5)
    ]
    assert sorted(int(o) for o in offsets) == [0, 1, 2, 3, 4]
    _shot(page, "topics")


def test_dead_letters_show_and_replay(
    flowing: Loop, api: str, keys: dict[str, str], browser: Browser
) -> None:
    page = _page(browser, api, keys["operator"])
    page.goto(f"{api}/console/deadletters.html")
    rows = page.locator("table.letters tbody tr")
    expect(rows.first).to_be_visible(timeout=WAIT_MS)
    expect(page.locator("table.letters")).to_contain_text("framing")
    expect(page.locator("table.letters")).to_contain_text(TASKS.name(flowing.s))
    before = rows.count()
    assert before >= 3
    page.locator("input.pick:not([disabled])").first.check()
    expect(page.locator("#selected")).to_have_text("1 selected")
    _shot(page, "deadletters")
    page.click("#replay")
    expect(page.locator("#replayed")).to_contain_text("replayed 1 of 1", timeout=WAIT_MS)
    # The replayed poison is refused again: a new letter arrives.
    for _ in range(20):
        page.click("#reload")
        page.wait_for_timeout(1000)
        if rows.count() > before:
            break
    assert rows.count() > before
    _shot(page, "deadletters-replayed")


def test_learning_shows_regret_checkpoints_and_ab(
    flowing: Loop, api: str, keys: dict[str, str], browser: Browser
) -> None:
    page = _page(browser, api, keys["operator"])
    page.goto(f"{api}/console/learning.html")
    expect(page.locator("#checkpoints-n")).to_have_text(re.compile(r"^[1-9]\d*$"), timeout=WAIT_MS)
    assert _number(page, "#rewards") >= N_TASKS - 10
    float(page.locator("#cum-regret").inner_text())
    float(page.locator("#cum-regret-random").inner_text())
    assert page.locator("#regret-chart svg path").count() == 2
    cps = page.locator("table.checkpoints")
    expect(cps).to_contain_text("neural-router")
    expect(cps).to_contain_text("holdout_loss=")
    expect(cps).to_contain_text(re.compile(r"promoted|rejected"))
    expect(page.locator("table.ab")).to_contain_text("thompson")
    _shot(page, "learning")
