"""The demo page in a real browser: Playwright drives Debian's chromium (no browser download) against a
`multiway serve` process on a built-in-data index: a text query shows thumbnails, an uploaded image gets a caption
and an answer, a broken upload shows an error, and the page still works after it. Saves a screenshot."""

import os

import pytest

from multiway.serve.screenshot import drive_demo, find_chromium

CHROMIUM = find_chromium(os.environ.get("MULTIWAY_CHROMIUM"))
if not CHROMIUM:
    pytest.skip("chromium is not installed (apt-get install chromium; .ci/run installs it)", allow_module_level=True)

from playwright.sync_api import sync_playwright  # noqa: E402
from serving_data import make_serving_data  # noqa: E402

from multiway.index import IndexConfig, build_index  # noqa: E402
from multiway.serve.loadtest import server_process  # noqa: E402


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    data = make_serving_data(root)
    build_index([data.images], root / "idx", IndexConfig(model=str(data.retrieval), progress=False))
    return data, root / "idx"


def test_demo_page_in_chromium(index, tmp_path):
    data, idx = index
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    args = ["--index", str(idx), "--captioner", str(data.captioner), "--vqa", str(data.vqa)]
    with server_process(args, env={"OMP_NUM_THREADS": "1"}, log_path=tmp_path / "serve.log") as (base, _):
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
            try:
                page = browser.new_page(viewport={"width": 1100, "height": 720})
                errors = []
                page.on("pageerror", lambda e: errors.append(str(e)))
                shown = drive_demo(page, base, sorted(data.images.glob("red_*.png"))[0], broken, "a red square", tmp_path / "demo.png")
            finally:
                browser.close()
    assert shown["hits"] == 8 and "model: retrieval" in shown["status"]
    assert "model: captioning" in shown["caption"] and "model: vqa" in shown["answer"]
    assert shown["answer"].split()[0] in {"red", "green", "blue", "yellow"}
    assert not errors, errors  # no script error on the page
    assert (tmp_path / "demo.png").stat().st_size > 10_000
