"""The web demo: a FastAPI app serving one local HTML page and a JSON API over an image index and up to three models.

API (every error is JSON ``{"error": message, "status": code}``; the OpenAPI schema is at ``/docs``):

* ``GET  /api/health``: the models by role, the index (folder, vectors, kind);
* ``GET  /api/search?q=TEXT&topk=K``: top-K images for a text query; ``POST /api/search`` (multipart ``image``):
  top-K images similar to an uploaded one. Hits: ``{"id", "path", "name", "score", "url"}``;
* ``POST /api/caption`` (``image``), ``POST /api/vqa`` (``image``, ``question``), ``POST /api/embed`` (``image`` or
  ``text``): each answer names the model that gave it;
* ``GET  /api/image/{id}``: the file of an indexed image (by row id, only inside the index's roots).

Safety: the server binds to 127.0.0.1 unless told otherwise; it serves only indexed files inside the index's
roots; uploads are limited in bytes (``max_upload_bytes``) and pixels (``max_pixels``, checked from the header
before decoding); a broken upload gets a 4xx; model work runs on a fixed pool of ``workers`` threads, concurrent
embedding requests are batched, and more than ``max_pending`` requests in flight get 429.
"""

from __future__ import annotations

import asyncio
import io
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..log import get_logger

STATIC_DIR = Path(__file__).parent / "static"
logger = get_logger(__name__)


@dataclass
class ServeConfig:
    """Settings of ``multiway serve``."""

    model: str | None = None  # retrieval model (default: the one the index records)
    captioner: str | None = None  # captioning model folder / .safetensors
    vqa: str | None = None  # VQAv2 model folder / .safetensors
    index: str | None = None  # an index folder from `multiway index build`
    tokenizer: str | None = None  # SentencePiece model, when the model folders do not record one
    host: str = "127.0.0.1"  # loopback only unless told otherwise
    port: int = 8080
    device: str = "cpu"
    max_upload_bytes: int = 10 * 2**20  # 10 MiB per uploaded image
    max_pixels: int = 40_000_000  # width x height of an uploaded image
    workers: int = 1  # threads running model work (bounded concurrency)
    max_batch: int = 32  # embedding requests batched together
    batch_wait_ms: float = 5.0  # how long the first request of a batch waits for company
    max_pending: int = 64  # requests in flight beyond which the server answers 429
    max_topk: int = 100
    num_beams: int | None = None  # captioning beams (default: the captioner's own setting)


class ApiError(Exception):
    """An error with its HTTP status, answered as JSON."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class MicroBatcher:
    """Collects concurrent single-item requests into one call of ``fn(items) -> results`` on the executor.

    The first item of a batch waits up to ``wait_s`` for others (at most ``max_batch``). The queue belongs to the
    event loop that first used it; another loop (a new test client) gets a fresh one.
    """

    def __init__(self, fn: Callable[[list], list], executor: ThreadPoolExecutor, max_batch: int, wait_s: float):
        self.fn, self.executor, self.max_batch, self.wait_s = fn, executor, max_batch, wait_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue | None = None
        self.batches: list[int] = []  # sizes of the last batches run (for tests and the load report)

    async def submit(self, item: Any) -> Any:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._loop, self._queue = loop, asyncio.Queue()
            loop.create_task(self._worker(self._queue))
        future = loop.create_future()
        await self._queue.put((item, future))
        return await future

    async def _worker(self, queue: asyncio.Queue) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await queue.get()]
            deadline = loop.time() + self.wait_s
            while len(batch) < self.max_batch:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(queue.get(), timeout))
                except asyncio.TimeoutError:
                    break
            items = [item for item, _ in batch]
            self.batches = [*self.batches[-99:], len(items)]
            try:
                results = await loop.run_in_executor(self.executor, self.fn, items)
            except Exception as e:  # hand the failure to every waiting request; the worker keeps serving
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            for (_, fut), res in zip(batch, results):
                if not fut.done():
                    fut.set_result(res)


def model_name(path: str | os.PathLike) -> str:
    """A display name for a model: its folder (or file) name."""
    p = Path(path)
    return p.name if p.name != "model.safetensors" else p.parent.name


def decode_upload(data: bytes, max_bytes: int, max_pixels: int):
    """Uploaded bytes -> an RGB PIL image, or :class:`ApiError` 413 (too large) / 400 (not a readable image)."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ApiError(400, "image: the upload is empty")
    if len(data) > max_bytes:
        raise ApiError(413, f"image: {len(data)} bytes exceeds the limit of {max_bytes} bytes")
    try:
        im = Image.open(io.BytesIO(data))
        width, height = im.size  # from the header: a pixel bomb is refused before it is decoded
        if width * height > max_pixels:
            raise ApiError(413, f"image: {width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}")
        im.load()
        return im.convert("RGB")
    except ApiError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ApiError(400, f"image: cannot decode the upload ({type(e).__name__}: {e})") from None


class Service:
    """The models, the index and the executor behind the API (no HTTP here)."""

    def __init__(self, cfg: ServeConfig):
        from ..downstream.predict import load_predictor
        from ..index import ImageIndex

        self.cfg = cfg
        self.index = ImageIndex.open(cfg.index) if cfg.index else None
        retrieval = cfg.model or (self.index.info.get("model") if self.index else None)
        tokenizer = cfg.tokenizer or (self.index.info.get("tokenizer") if self.index else None)
        self.retrieval = load_predictor(retrieval, tokenizer=tokenizer, device=cfg.device) if retrieval else None
        self.captioner = load_predictor(cfg.captioner, tokenizer=cfg.tokenizer, device=cfg.device) if cfg.captioner else None
        self.vqa = load_predictor(cfg.vqa, tokenizer=cfg.tokenizer, device=cfg.device) if cfg.vqa else None
        self.names = {"retrieval": model_name(retrieval) if retrieval else None,
                      "captioner": model_name(cfg.captioner) if cfg.captioner else None,
                      "vqa": model_name(cfg.vqa) if cfg.vqa else None}
        if self.retrieval is not None and self.index is not None and self.index.dim != self.retrieval.model.config.embed_dim:
            raise ValueError(f"--model gives {self.retrieval.model.config.embed_dim}-d vectors but the index {cfg.index} holds "
                             f"{self.index.dim}-d ones")
        self.executor = ThreadPoolExecutor(max_workers=max(1, cfg.workers), thread_name_prefix="multiway-model")
        wait = cfg.batch_wait_ms / 1000
        self.text_batcher = MicroBatcher(self._embed_texts, self.executor, cfg.max_batch, wait)
        self.image_batcher = MicroBatcher(self._embed_images, self.executor, cfg.max_batch, wait)
        self.pending = 0
        self.tmp = tempfile.TemporaryDirectory(prefix="multiway-serve-")

    # -- model work (runs on the executor) ------------------------------------------------------------------

    def _embed_texts(self, texts: list[str]):
        from ..downstream.predict import embed_texts

        return list(embed_texts(self.retrieval, texts))

    def _spool(self, images: Sequence) -> list[Path]:
        """Write decoded uploads as PNG files, the predictor's input (one code path with the command line)."""
        paths = []
        for im in images:
            fd, name = tempfile.mkstemp(suffix=".png", dir=self.tmp.name)
            with os.fdopen(fd, "wb") as f:
                im.save(f, format="PNG")
            paths.append(Path(name))
        return paths

    def _embed_images(self, images: list):
        from ..downstream.predict import embed_images

        paths = self._spool(images)
        try:
            vectors, ok, errors = embed_images(self.retrieval, paths)
            if errors:
                raise ApiError(400, f"image: {errors[0]}")
            return list(vectors)
        finally:
            for p in paths:
                p.unlink(missing_ok=True)

    def caption_image(self, image) -> str:
        from ..downstream.predict import caption

        (path,) = self._spool([image])
        try:
            result = caption(self.captioner, [path], num_beams=self.cfg.num_beams)
        finally:
            path.unlink(missing_ok=True)
        if not result.rows:
            raise ApiError(400, f"image: {result.errors[0] if result.errors else 'cannot caption'}")
        return result.rows[0]["caption"]

    def answer_question(self, image, question: str) -> dict:
        from ..downstream.predict import answer

        (path,) = self._spool([image])
        try:
            result = answer(self.vqa, [path], question, topk=3)
        finally:
            path.unlink(missing_ok=True)
        if not result.rows:
            raise ApiError(400, f"image: {result.errors[0] if result.errors else 'cannot answer'}")
        return {"answer": result.rows[0]["answer"], "top": result.rows[0]["top"]}

    # -- helpers for the endpoints ----------------------------------------------------------------------------

    def need(self, role: str):
        pred = {"retrieval": self.retrieval, "captioner": self.captioner, "vqa": self.vqa}[role]
        if pred is None:
            flag = {"retrieval": "--model", "captioner": "--captioner", "vqa": "--vqa"}[role]
            raise ApiError(409, f"this server has no {role} model (start it with {flag})")
        return pred

    def hits(self, vector, topk: int) -> list[dict]:
        if self.index is None:
            raise ApiError(409, "this server has no index (start it with --index DIR)")
        topk = max(1, min(int(topk), self.cfg.max_topk))
        return [{**h.to_dict(), "name": Path(h.path).name, "url": f"/api/image/{h.id}"} for h in self.index.search(vector[None], k=topk)[0]]


def create_app(cfg: ServeConfig, service: Service | None = None) -> FastAPI:
    """The FastAPI application for ``cfg`` (models and index are loaded here, once)."""
    svc = service or Service(cfg)
    app = FastAPI(title="multiway demo", description="Search, caption and question images with BEiT-3 models.", version="1")
    app.state.service = svc

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message, "status": status}, status_code=status)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error(exc.status, exc.message)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        parts = [f"{'.'.join(str(x) for x in e.get('loc', ()) if x != 'body')}: {e.get('msg')}" for e in exc.errors()]
        return error(422, "; ".join(parts) or "invalid request")

    @app.middleware("http")
    async def _limit_body(request: Request, call_next):
        # refuse an oversized upload from its declared length, before the body is read
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > cfg.max_upload_bytes + 64 * 1024:
            return error(413, f"request body of {length} bytes exceeds the upload limit of {cfg.max_upload_bytes} bytes")
        return await call_next(request)

    async def admitted(fn, *args):
        """Run ``fn`` (a coroutine function) unless too many requests are in flight (429 then)."""
        if svc.pending >= cfg.max_pending:
            raise ApiError(429, f"busy: {svc.pending} requests in flight; retry shortly")
        svc.pending += 1
        try:
            return await fn(*args)
        finally:
            svc.pending -= 1

    async def read_image(image: UploadFile):
        data = await image.read(cfg.max_upload_bytes + 1)
        return decode_upload(data, cfg.max_upload_bytes, cfg.max_pixels)

    async def on_executor(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(svc.executor, fn, *args)

    @app.get("/api/health")
    async def health() -> dict:
        index = None
        if svc.index is not None:
            index = {"dir": str(svc.index.root), "vectors": len(svc.index), "kind": svc.index.info.get("kind", "flat")}
        return {"status": "ok", "models": svc.names, "index": index, "pending": svc.pending}

    @app.get("/api/search")
    async def search_text(q: Annotated[str, Query(min_length=1, max_length=1000, description="text query")],
                          topk: Annotated[int, Query(ge=1, le=1000)] = 8) -> dict:
        svc.need("retrieval")

        async def run():
            t = time.perf_counter()
            vector = await svc.text_batcher.submit(q)
            return {"query": q, "model": svc.names["retrieval"], "hits": svc.hits(vector, topk),
                    "ms": round(1000 * (time.perf_counter() - t), 1)}

        return await admitted(run)

    @app.post("/api/search")
    async def search_image(image: Annotated[UploadFile, File()], topk: Annotated[int, Form(ge=1, le=1000)] = 8) -> dict:
        svc.need("retrieval")
        im = await read_image(image)

        async def run():
            vector = await svc.image_batcher.submit(im)
            return {"model": svc.names["retrieval"], "hits": svc.hits(vector, topk)}

        return await admitted(run)

    @app.post("/api/caption")
    async def caption(image: Annotated[UploadFile, File()]) -> dict:
        svc.need("captioner")
        im = await read_image(image)

        async def run():
            return {"caption": await on_executor(svc.caption_image, im), "model": svc.names["captioner"]}

        return await admitted(run)

    @app.post("/api/vqa")
    async def vqa(image: Annotated[UploadFile, File()], question: Annotated[str, Form(min_length=1, max_length=500)]) -> dict:
        svc.need("vqa")
        im = await read_image(image)

        async def run():
            return {"question": question, **(await on_executor(svc.answer_question, im, question)), "model": svc.names["vqa"]}

        return await admitted(run)

    @app.post("/api/embed")
    async def embed(image: Annotated[UploadFile | None, File()] = None, text: Annotated[str | None, Form(max_length=1000)] = None) -> dict:
        svc.need("retrieval")
        if (image is None) == (text is None):
            raise ApiError(400, "embed: give exactly one of the form fields 'image' or 'text'")
        im = await read_image(image) if image is not None else None

        async def run():
            vector = await (svc.image_batcher.submit(im) if im is not None else svc.text_batcher.submit(text))
            return {"embedding": [round(float(x), 6) for x in vector], "dim": len(vector), "model": svc.names["retrieval"]}

        return await admitted(run)

    @app.get("/api/image/{image_id}")
    async def image_file(image_id: int):
        if svc.index is None:
            raise ApiError(404, "this server has no index")
        path = svc.index.path_of(image_id)
        if path is None:
            raise ApiError(404, f"no indexed image with id {image_id}")
        resolved = Path(path).resolve()
        # the row's path was resolved when indexed; a symlink swapped in since then must still stay inside the roots
        if not svc.index.inside_roots(resolved) or not resolved.is_file():
            raise ApiError(403, f"image {image_id} is not a file inside the index's roots")
        return FileResponse(resolved)

    @app.get("/api/file")
    async def file_by_path(path: Annotated[str, Query(max_length=4096)]):
        if svc.index is None:
            raise ApiError(404, "this server has no index")
        resolved = Path(path).resolve()
        if not svc.index.inside_roots(resolved) or not svc.index.contains_path(str(resolved)):
            raise ApiError(403, "path: only indexed images inside the index's roots are served")
        return FileResponse(resolved)

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def serve(cfg: ServeConfig) -> None:
    """Run the app with uvicorn on ``cfg.host:cfg.port`` (blocking)."""
    import ipaddress

    import uvicorn

    try:
        loopback = ipaddress.ip_address(cfg.host).is_loopback
    except ValueError:
        loopback = cfg.host == "localhost"
    if not loopback:
        logger.warning("binding to %s: the demo is reachable from other machines", cfg.host)
    app = create_app(cfg)
    logger.info("serving on http://%s:%d/ (API under /api/, schema at /docs)", cfg.host, cfg.port)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning")
