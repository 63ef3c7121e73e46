"""Drive the demo page in a real browser (Playwright on an installed chromium) as a person would, and save a
screenshot. The browser test runs :func:`drive_demo`; run as a module it makes the documentation's screenshot from
the quickstart's outputs::

    python -m multiway.serve.screenshot --quickstart quickstart --out docs/img/serve_demo.png

(it builds ``quickstart/index`` from ``quickstart/data/images/test`` if missing and serves the pretrained
retrieval, captioning and VQA models; Playwright uses ``--chromium``, default the ``chromium`` on PATH, and never
downloads a browser).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path


def drive_demo(page, base: str, image: Path, broken: Path | None, query: str, screenshot: Path,
               question: str = "what color is the shape?", timeout_ms: int = 60_000) -> dict:
    """Type a query and wait for loaded thumbnails, upload ``image``, caption it, ask ``question``, screenshot, find
    similar images, then upload ``broken`` and expect the error, and search again. Any step that does not happen
    within ``timeout_ms`` raises. Returns what the page showed."""
    from playwright.sync_api import expect

    page.set_default_timeout(timeout_ms)
    page.goto(base + "/")
    expect(page.locator("#models")).to_contain_text("retrieval:")
    page.fill("#query", query)
    page.click("#search-btn")
    thumbs = page.locator("#results figure.hit img")
    expect(thumbs.first).to_be_visible()
    page.wait_for_function("[...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)")
    shown = {"hits": thumbs.count(), "status": page.locator("#search-status").inner_text()}
    page.set_input_files("#file", str(image))
    expect(page.locator("#caption-btn")).to_be_enabled()
    page.click("#caption-btn")
    expect(page.locator("#caption-out")).to_contain_text("model:")
    shown["caption"] = page.locator("#caption-out").inner_text()
    page.fill("#question", question)
    page.click("#vqa-btn")
    expect(page.locator("#vqa-out")).to_contain_text("model:")
    shown["answer"] = page.locator("#vqa-out").inner_text()
    page.screenshot(path=str(screenshot), full_page=True)
    page.click("#similar-btn")
    expect(page.locator("#search-status")).to_contain_text("your image")
    if broken is not None:
        page.set_input_files("#file", str(broken))
        page.click("#caption-btn")
        expect(page.locator("#error")).to_contain_text("cannot decode")
        shown["error"] = page.locator("#error").inner_text()
        page.fill("#query", query)  # the server keeps serving after the bad upload
        page.click("#search-btn")
        expect(page.locator("#search-status")).to_contain_text("results for")
    return shown


def find_chromium(explicit: str | None = None) -> str | None:
    return explicit or shutil.which("chromium") or shutil.which("chromium-browser")


def main(argv: list[str] | None = None) -> int:
    from playwright.sync_api import sync_playwright

    from ..index import IndexConfig, build_index
    from .loadtest import server_process

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quickstart", default="quickstart", help="a `multiway quickstart` output folder")
    parser.add_argument("--out", default="docs/img/serve_demo.png")
    parser.add_argument("--query", default="a red circle")
    parser.add_argument("--chromium", help="the browser executable (default: chromium on PATH)")
    args = parser.parse_args(argv)
    qs = Path(args.quickstart)
    runs, images, index = qs / "runs", qs / "data" / "images" / "test", qs / "index"
    chromium = find_chromium(args.chromium)
    if not chromium:
        raise SystemExit("no chromium found: apt-get install chromium, or pass --chromium PATH")
    if not (index / "vectors.faiss").is_file():
        build_index([images], index, IndexConfig(model=str(runs / "coco_retrieval_pretrained"), progress=False))
    serve_args = ["--index", str(index), "--captioner", str(runs / "coco_captioning_pretrained"), "--vqa", str(runs / "vqav2_pretrained")]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with server_process(serve_args) as (base, _), sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 720})
            shown = drive_demo(page, base, sorted(images.glob("*.png"))[0], None, args.query, out)
        finally:
            browser.close()
    print(f"wrote {out}: {shown}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
