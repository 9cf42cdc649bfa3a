"""The dashboard in a real headless browser: Debian's Chromium driven by Playwright, fully offline.

Needs `/usr/bin/chromium` (`apt-get install -y chromium`) and the `playwright` wheel (its driver only:
no `playwright install`, which downloads a browser). Missing either fails the test in CI (CI set to
a true value) and skips it elsewhere. A full-page screenshot lands in results/test-artifacts/.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from search.dashboard import FIGURE_IDS, SECTION_IDS, write_dashboard
from tests.test_dashboard import RESNET_CONFIG, finalize_fake, make_run

pytestmark = pytest.mark.slow

CHROMIUM = os.environ.get("ANOSEG_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parents[1] / "results" / "test-artifacts"
RENDER_TIMEOUT_MS = 60_000


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require_browser() -> None:
    """Fail in CI, skip elsewhere, when Chromium or Playwright is missing."""
    missing = []
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the Python package playwright (pip install playwright; do not run `playwright install`)")
    if not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
        missing.append(f"Chromium at {CHROMIUM} (apt-get update && apt-get install -y chromium)")
    if missing:
        message = "browser test needs " + " and ".join(missing)
        if in_ci():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)


def launch(pw, profile: Path, width: int = 1280):
    """Debian's Chromium, headless, with a fresh profile and no network."""
    return pw.chromium.launch_persistent_context(
        str(profile), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
        viewport={"width": width, "height": 900}, offline=True)


@pytest.fixture(scope="module")
def browser_context(tmp_path_factory):
    require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        context = launch(pw, tmp_path_factory.mktemp("chromium-profile"))
        yield context
        context.close()


class PageLog:
    """Console errors, page errors and every request that is not a file:// or data: URL."""

    def __init__(self, page) -> None:
        self.errors: list[str] = []
        self.network: list[str] = []
        page.on("console", lambda msg: self.errors.append(f"console.{msg.type}: {msg.text}") if msg.type == "error" else None)
        page.on("pageerror", lambda exc: self.errors.append(f"page error: {exc}"))
        page.on("request", lambda req: None if req.url.startswith(("file://", "data:")) else self.network.append(req.url))


def open_dashboard(context, path: Path):
    page = context.new_page()
    log = PageLog(page)
    page.goto(path.resolve().as_uri(), wait_until="load", timeout=RENDER_TIMEOUT_MS)
    for fid in FIGURE_IDS:  # Plotly draws each figure into an SVG inside its div
        page.wait_for_selector(f"#{fid}-plot.js-plotly-plot .main-svg", state="attached", timeout=RENDER_TIMEOUT_MS)
    return page, log


def test_dashboard_renders_in_chromium(browser_context, tmp_path, synthetic_root):
    run = make_run(tmp_path, data_root=synthetic_root, best_config=RESNET_CONFIG, protocol="holdout")
    finalize_fake(run)  # the validation-vs-test figures with their error bars
    page, log = open_dashboard(browser_context, write_dashboard(run, examples=2))
    try:
        for sid in SECTION_IDS:
            assert page.locator(f"section#{sid} h2").count() == 1, sid
        for fid in FIGURE_IDS:
            figure = page.locator(f"section#{fid} #{fid}-plot")
            assert "js-plotly-plot" in (figure.get_attribute("class") or ""), fid
            assert figure.locator(".main-svg").count() >= 1, fid
            box = figure.bounding_box()
            assert box and box["width"] > 400 and box["height"] > 150, (fid, box)
        # the data made it into the SVGs: a heatmap cell label, the parallel-coordinates axes, tick labels
        assert page.locator("#heatmap-plot text", has_text="c0000005").count() >= 1
        axes = page.locator("#parallel-plot .axis-title").evaluate_all("els => els.map(e => e.textContent)")
        assert {"backbone", "layers", "head", "padim.n_features", "aupro (validation part)"} <= set(axes), axes
        # the finalised trials: validation and test series, drawn with their interval bars
        assert page.locator("#final-plot .errorbar").count() >= 2
        assert "Kendall" in page.locator("#agreement-plot .gtitle").text_content()
        # failed trials: a table row per failed / crashed / lost trial with its error
        rows = page.locator("section#failures table tbody tr")
        assert rows.count() == 3
        assert "cannot read image" in page.locator("section#failures").inner_text()
        # examples: decoded images
        images = page.locator("section#examples img")
        assert images.count() == 2
        assert all(images.nth(i).evaluate("img => img.complete && img.naturalWidth > 0") for i in range(2))
        assert not log.errors, log.errors
        assert not log.network, f"the page requested {log.network}: it must work offline"
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
        assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000
    finally:
        page.close()


def test_dashboard_without_finished_trials_renders_in_chromium(browser_context, tmp_path):
    run = make_run(tmp_path, completed=0, stopped=0, failed=True, running=2)
    page, log = open_dashboard(browser_context, write_dashboard(run, examples=4))
    try:
        assert "No trial has evaluated every category yet" in page.locator("section#summary").inner_text()
        assert page.locator("section#failures table tbody tr").count() == 3
        assert not log.errors, log.errors
        assert not log.network, log.network
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "dashboard-no-finished-trial.png"), full_page=True)
    finally:
        page.close()


def docs_screenshot(html_file: Path, png: Path, width: int = 1200, out_width: int = 1000) -> Path:
    """A full-page screenshot of a dashboard for the docs: scaled to `out_width`, 256-colour palette PNG."""
    import tempfile

    from PIL import Image
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw, tempfile.TemporaryDirectory() as profile:
        context = launch(pw, Path(profile), width)
        page, log = open_dashboard(context, html_file)
        assert not log.errors, log.errors
        raw = Path(profile) / "page.png"
        page.screenshot(path=str(raw), full_page=True)
        context.close()
        image = Image.open(raw).convert("RGB")
    image = image.resize((out_width, round(image.height * out_width / image.width)), Image.LANCZOS)
    image.quantize(colors=256, method=Image.Quantize.FASTOCTREE).save(png, optimize=True)
    return png


if __name__ == "__main__":  # python -m tests.test_dashboard_browser results/<run>/dashboard.html docs/dashboard.png
    import sys

    print(docs_screenshot(Path(sys.argv[1]), Path(sys.argv[2])))
