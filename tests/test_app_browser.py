"""The comparison app end to end in a real browser: `streamlit run app/main.py` headless on the
default study's store, Debian's Chromium driven by Playwright (no browser download), two runs
picked on the Compare page, their curves overlaid, the diff of their graphs; screenshots are
saved in the test's folder."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow
CHROMIUM = "/usr/bin/chromium"
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run"]
IDLE = '[data-testid="stApp"][data-test-script-state="notRunning"]'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Served:
    url: str
    uri: str        # its MLflow store


@pytest.fixture
def server(default_study):
    """The app served on localhost from the default study's folder, as a user would run it."""
    assert default_study.returncode == 0, default_study.stderr[-2000:]
    port = free_port()
    env = dict(os.environ, MLFLOW_TRACKING_URI=default_study.tracking_uri,
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    log = default_study.folder / "streamlit.log"
    url = f"http://localhost:{port}"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(ROOT / "app" / "main.py"),
                                 "--server.headless", "true", "--server.port", str(port)],
                                cwd=default_study.folder, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_healthy(url, proc, log)
            yield Served(url, default_study.tracking_uri)
        finally:
            proc.terminate()
            proc.wait(timeout=20)


def wait_healthy(url: str, proc, log: Path, timeout_s: float = 60) -> None:
    deadline = time.time() + timeout_s
    while True:
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                return
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"streamlit did not start: {log.read_text()}")
            time.sleep(0.5)


def expected_highlights(uri: str, labels: list[str]) -> int:
    """How many nodes the diff of the two runs' graphs fills on the two diagrams."""
    import graphs
    from app import store
    from app.graphdiff import diff

    table = store.runs_table(uri)
    ids = [next(r for r in table["run_id"] if r.startswith(label.split(" · ")[-1])) for label in labels]
    a, b = (graphs.elaborate(graphs.loads(store.artifact_text(uri, i, "graph.yaml"))) for i in ids)
    d = diff(a, b)
    return len(d.highlight_a) + len(d.highlight_b)


def settle(page, timeout_ms: int = 90_000) -> None:
    """Wait until the script run the last interaction started has finished."""
    page.wait_for_timeout(1000)
    page.wait_for_selector(IDLE, timeout=timeout_ms)
    page.wait_for_selector('[data-testid="stSkeleton"]', state="detached", timeout=timeout_ms)


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed "
                    "(.ci/install-system installs it)")
def test_pick_two_runs_see_their_curves_and_the_graph_diff(server, tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        page = browser.new_page(viewport={"width": 1500, "height": 1800})
        page.goto(f"{server.url}/compare")
        settle(page)
        picker = page.get_by_test_id("stMultiSelect").filter(has_text="Runs to compare")
        chips = picker.locator("[data-tag]")
        while chips.count() > 1:                          # keep the best run ...
            picker.get_by_role("button", name="Remove " + chips.last.get_attribute("aria-label")).click()
            settle(page)
        picker.get_by_role("combobox").click()            # ... and pick another from the list
        page.get_by_role("option").filter(has_not_text="Select all").first.click()
        page.keyboard.press("Escape")
        settle(page)
        assert chips.count() == 2
        picked = [chips.nth(i).get_attribute("aria-label") for i in range(2)]
        curves = page.get_by_test_id("stPlotlyChart").first
        curves.locator(".legendtext").first.wait_for()
        legend = [t.strip() for t in curves.locator(".legendtext").all_text_contents()]
        assert legend == picked
        assert curves.locator(".scatterlayer .trace").count() == 2
        page.screenshot(path=str(tmp_path / "compare.png"), full_page=True)

        page.get_by_role("button", name="Diff the graphs of the first two").click()
        settle(page)
        page.get_by_text("What differs").wait_for()
        diagrams = page.get_by_test_id("stGraphVizChart")
        diagrams.nth(1).locator("svg").wait_for()
        assert diagrams.count() == 2
        filled = page.locator('[data-testid="stGraphVizChart"] svg polygon[fill="#ffd7a8"]').count()
        assert filled == expected_highlights(server.uri, picked)
        page.screenshot(path=str(tmp_path / "graph-diff.png"), full_page=True)
        browser.close()
    assert (tmp_path / "compare.png").stat().st_size > 0 and (tmp_path / "graph-diff.png").stat().st_size > 0
