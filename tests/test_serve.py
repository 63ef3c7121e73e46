"""The demo server's API through FastAPI's test client (search, caption, VQA, embed, bad uploads, path
traversal, batching, admission), and a bounded load test on localhost against a real uvicorn process."""

import asyncio
import dataclasses
import io
import os

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("faiss")

from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402
from serving_data import make_serving_data  # noqa: E402

from multiway.index import IndexConfig, build_index  # noqa: E402
from multiway.serve import ServeConfig, Service, create_app  # noqa: E402
from multiway.serve.loadtest import rss_mb, run_load, server_process  # noqa: E402


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    data = make_serving_data(root)
    (data.images / "broken.png").write_bytes(b"not a png at all")
    build_index([data.images], root / "idx", IndexConfig(model=str(data.retrieval), progress=False))
    cfg = ServeConfig(index=str(root / "idx"), captioner=str(data.captioner), vqa=str(data.vqa), max_upload_bytes=50_000,
                      max_pixels=1_000_000)
    service = Service(cfg)
    return data, cfg, service, TestClient(create_app(cfg, service))


def _png(path=None, size=(32, 32), color=(220, 30, 30)) -> bytes:
    if path is not None:
        return open(path, "rb").read()
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def test_health_page_and_schema(served):
    _, _, _, client = served
    health = client.get("/api/health").json()
    assert health["models"] == {"retrieval": "retrieval", "captioner": "captioning", "vqa": "vqa"}
    assert health["index"]["vectors"] == 8 and health["index"]["kind"] == "flat"
    page = client.get("/")
    script, style = client.get("/static/app.js"), client.get("/static/style.css")
    assert page.status_code == script.status_code == style.status_code == 200 and 'src="/static/app.js"' in page.text
    assert not any("://" in r.text for r in (page, script, style))  # nothing is loaded from another host
    assert {"/api/search", "/api/caption", "/api/vqa", "/api/embed", "/api/health"} <= set(client.get("/openapi.json").json()["paths"])
    assert client.get("/docs").status_code == 200


def test_text_search_returns_thumbnails_that_load(served):
    data, _, _, client = served
    body = client.get("/api/search", params={"q": "a red square", "topk": 3}).json()
    assert body["model"] == "retrieval" and len(body["hits"]) == 3
    scores = [h["score"] for h in body["hits"]]
    assert scores == sorted(scores, reverse=True)
    image = client.get(body["hits"][0]["url"])
    assert image.status_code == 200 and image.content == open(body["hits"][0]["path"], "rb").read()


def test_image_search_caption_vqa_embed(served):
    data, _, _, client = served
    path = sorted(data.images.glob("blue_0.png"))[0]
    files = {"image": ("q.png", _png(path), "image/png")}
    hits = client.post("/api/search", files=files, data={"topk": 2}).json()["hits"]
    assert hits[0]["path"] == str(path.resolve()) and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    cap = client.post("/api/caption", files=files).json()
    assert isinstance(cap["caption"], str) and cap["model"] == "captioning"
    ans = client.post("/api/vqa", files=files, data={"question": "what color is the square"}).json()
    assert ans["answer"] in {"red", "green", "blue", "yellow"} and ans["model"] == "vqa" and len(ans["top"]) == 3
    emb = client.post("/api/embed", data={"text": "a blue square"}).json()
    assert emb["dim"] == 64 and np.linalg.norm(emb["embedding"]) == pytest.approx(1.0, abs=1e-4)
    emb = client.post("/api/embed", files=files).json()
    assert emb["dim"] == 64


def test_bad_uploads_get_4xx_json_and_the_server_keeps_serving(served):
    _, cfg, _, client = served
    cases = [
        ({"image": ("x.png", b"not an image", "image/png")}, 400, "cannot decode"),
        ({"image": ("x.png", b"", "image/png")}, 400, "empty"),
        ({"image": ("x.png", _png()[:60], "image/png")}, 400, "cannot decode"),  # truncated
        ({"image": ("x.png", _png(size=(1100, 1000)), "image/png")}, 413, "pixels exceeds"),  # small file, many pixels
        ({"image": ("x.bin", os.urandom(cfg.max_upload_bytes + 10), "image/png")}, 413, "exceeds"),
    ]
    for files, status, message in cases:
        r = client.post("/api/caption", files=files)
        assert r.status_code == status and message in r.json()["error"], (files["image"][0], r.status_code, r.text)
    r = client.post("/api/caption", files={})
    assert r.status_code == 422 and "image" in r.json()["error"]
    r = client.post("/api/vqa", files={"image": ("x.png", _png(), "image/png")})
    assert r.status_code == 422 and "question" in r.json()["error"]
    assert client.post("/api/embed", data={}).status_code == 400
    assert client.get("/api/search", params={"q": ""}).status_code == 422
    assert client.get("/api/health").json()["status"] == "ok"


def test_no_path_traversal(served):
    data, _, _, client = served
    root = data.images.resolve()
    for path in ("/etc/passwd", f"{root}/../../../../etc/passwd", f"{root}/../spm.model", f"{root}/broken.png"):
        r = client.get("/api/file", params={"path": path})
        assert r.status_code == 403 and "error" in r.json(), path
    assert client.get("/api/file", params={"path": f"{root}/../train/red_0.png"}).status_code == 200  # normalised inside
    assert client.get("/api/image/999999").status_code == 404
    assert client.get("/static/..%2f..%2fapp.py").status_code == 404
    assert client.get("/static/../app.py").status_code == 404


def test_concurrent_embedding_requests_are_batched_and_admission_is_bounded(served):
    import httpx

    data, cfg, service, _ = served
    app = create_app(cfg, service)

    async def burst():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
            return await asyncio.gather(*(http.get("/api/search", params={"q": f"a square {i}"}) for i in range(12)))

    responses = asyncio.run(burst())
    assert all(r.status_code == 200 for r in responses)
    assert max(service.text_batcher.batches) > 1  # several queries shared one model call
    busy = TestClient(create_app(dataclasses.replace(cfg, max_pending=0), service))  # same models, no room
    r = busy.get("/api/search", params={"q": "a red square"})
    assert r.status_code == 429 and "busy" in r.json()["error"]


def test_load_on_localhost_no_5xx_and_bounded_memory(served, tmp_path):
    data, cfg, _, _ = served
    args = ["--index", cfg.index, "--captioner", cfg.captioner, "--vqa", cfg.vqa]
    image = _png(sorted(data.images.glob("*.png"))[0])
    plan = [("search", {"method": "GET", "url": "/api/search?q=a+red+square&topk=4"}),
            ("similar", {"method": "POST", "url": "/api/search", "files": {"image": ("a.png", image, "image/png")}}),
            ("caption", {"method": "POST", "url": "/api/caption", "files": {"image": ("a.png", image, "image/png")}}),
            ("bad", {"method": "POST", "url": "/api/caption", "files": {"image": ("a.png", b"junk", "image/png")}}),
            ("vqa", {"method": "POST", "url": "/api/vqa", "files": {"image": ("a.png", image, "image/png")},
                     "data": {"question": "what color is the square"}})]
    with server_process(args, env={"OMP_NUM_THREADS": "1"}, log_path=tmp_path / "serve.log") as (base, proc):
        run_load(base, plan, clients=4, duration_s=1.0, max_requests=40)  # warm-up: first calls allocate
        before = rss_mb(proc.pid)
        report = run_load(base, plan, clients=8, duration_s=3.0, max_requests=300)
        after = rss_mb(proc.pid)
        assert proc.poll() is None
    assert report.requests > 20 and not report.failures, report.failures[:3]
    assert report.server_errors == 0, report.statuses
    assert set(report.statuses) <= {200, 400}
    assert after - before < 200, (before, after)
