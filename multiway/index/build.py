"""Build and grow an image index: embed with the dual encoder, commit batch by batch, write the FAISS index.

``build`` and ``add`` are one operation: list the images, keep the rows whose (path, mtime, size) are unchanged,
embed the new and changed files, drop the rows of files that disappeared from the listed folders, and rebuild the
vector index. Run on an existing folder, it therefore resumes a killed build: every committed batch is kept.

Under ``torchrun`` each rank embeds its share of the files to do (``todo[rank::world]``) into its own shard
database; rank 0 merges the shards and writes the vector index. Shards left by a killed distributed run are
merged at the start of the next one, so nothing finished is lost there either.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from .store import (
    META_FILE,
    SHARDS_DIR,
    IndexStateError,
    build_faiss,
    connect,
    file_key,
    load_vectors,
    merge_shard,
    read_info,
    rows_under,
    write_faiss,
    write_info,
    write_rows,
)


@dataclass
class IndexConfig:
    """Settings of ``multiway index build`` / ``add``."""

    model: str = ""  # the retrieval model: a `multiway finetune` output folder or a .safetensors file
    tokenizer: str | None = None  # SentencePiece model, when the model folder does not name one (search needs it)
    batch_size: int = 32  # images per embedding batch; each batch is one committed transaction
    kind: Literal["auto", "flat", "ivfpq"] = "auto"  # auto: exact inner product below ivfpq_threshold vectors, IVF-PQ from there on
    ivfpq_threshold: int = 100_000
    nlist: int = 0  # IVF lists (0: about 4 sqrt(N))
    pq_m: int = 0  # PQ sub-quantizers, a divisor of the embedding dimension (0: D/8)
    nprobe: int = 16  # IVF lists visited per query
    device: str | None = None  # cpu / cuda (default: cuda when available)
    progress: bool = True  # a tqdm bar on stderr


@dataclass
class BuildReport:
    """What a build or add did. ``errors``: ``"<path>: <reason>"`` of the images that could not be read."""

    index_dir: str
    total: int = 0  # images listed
    embedded: int = 0  # embedded in this run (all ranks)
    unchanged: int = 0  # already in the index with the same mtime and size
    removed: int = 0  # rows of files that no longer exist under the listed folders
    merged: int = 0  # rows recovered from the shards of an interrupted distributed run
    vectors: int = 0  # vectors in the index afterwards
    kind: str = "flat"
    per_rank: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def list_inputs(inputs: Sequence[str | os.PathLike]) -> tuple[list[Path], list[Path]]:
    """(image files, roots): folders expanded recursively (image extensions), files kept; all resolved absolute."""
    from ..downstream.predict import list_images

    roots, files = [], []
    for item in inputs:
        p = Path(item)
        if not p.exists():
            raise FileNotFoundError(f"index: input not found: {item}")
        roots.append(p.resolve())
    for p in list_images(roots):
        files.append(p.resolve())
    return sorted(set(files)), roots


def _todo(conn, files: Sequence[Path]) -> tuple[list[tuple[Path, int, int]], int]:
    """The files to embed (new, or mtime/size changed) with their keys, and the count of unchanged ones."""
    known = {p: (m, s) for p, m, s in conn.execute("SELECT path, mtime_ns, size FROM images").fetchall()}
    todo, unchanged = [], 0
    for f in files:
        try:
            key = file_key(f)
        except OSError:  # vanished between listing and stat: nothing to embed
            continue
        if known.get(str(f)) == key:
            unchanged += 1
        else:
            todo.append((f, *key))
    return todo, unchanged


def _embed_into(conn, pred, todo: Sequence[tuple[Path, int, int]], batch_size: int, progress: bool, desc: str) -> tuple[int, list[str]]:
    """Embed ``todo`` batch by batch, one committed transaction per batch. Returns (embedded, errors)."""
    from ..downstream.predict import embed_images
    from ..log import progress as progress_bar

    embedded, errors = 0, []
    bar = progress_bar(total=len(todo), desc=desc, unit="img", disable=not progress or not todo, file=sys.stderr, mininterval=1.0)
    for i in range(0, len(todo), batch_size):
        chunk = todo[i : i + batch_size]
        vectors, ok_paths, errs = embed_images(pred, [p for p, _, _ in chunk], batch_size=batch_size)
        by_path = dict(zip(ok_paths, vectors))
        rows = []
        for path, mtime, size in chunk:
            if str(path) in by_path:
                rows.append((str(path), mtime, size, "ok", None, by_path[str(path)]))
            else:
                reason = next((e[len(str(path)) + 2 :] for e in errs if e.startswith(f"{path}: ")), "cannot read image")
                rows.append((str(path), mtime, size, "error", reason, None))
                errors.append(f"{path}: {reason}")
        write_rows(conn, rows)
        embedded += len(ok_paths)
        bar.update(len(chunk))
    bar.close()
    return embedded, errors


def _check_or_write_info(conn, cfg: IndexConfig, model_path: str, dim: int, roots: Sequence[Path], out: Path) -> dict:
    info = read_info(conn)
    if info and info.get("dim") != dim:
        raise IndexStateError(f"{out}: the index holds {info.get('dim')}-d vectors of model {info.get('model')}, "
                              f"but {model_path} gives {dim}-d vectors; use a new --out folder")
    merged_roots = sorted({*info.get("roots", []), *(str(r) for r in roots)})
    info.update({"model": info.get("model") or model_path, "dim": dim, "roots": merged_roots,
                 "tokenizer": cfg.tokenizer or info.get("tokenizer")})
    write_info(conn, info)
    return info


def _rebuild_vectors(conn, out: Path, cfg: IndexConfig, dim: int) -> tuple[int, str]:
    ids, vectors = load_vectors(conn, dim)
    kind = cfg.kind if cfg.kind != "auto" else ("ivfpq" if len(ids) >= cfg.ivfpq_threshold else "flat")
    write_faiss(out, build_faiss(ids, vectors, kind=kind, nlist=cfg.nlist, pq_m=cfg.pq_m, nprobe=cfg.nprobe))
    write_info(conn, {"kind": kind, "vectors": len(ids)})
    return len(ids), kind


def build_index(inputs: Sequence[str | os.PathLike], out: str | os.PathLike, cfg: IndexConfig) -> BuildReport:
    """Create or update the index folder ``out`` with the images under ``inputs`` (folders or files).

    Incremental: only new or changed files (by path, mtime and size) are embedded. Resumable: rerunning after a kill
    keeps every committed batch. Under ``torchrun`` (``WORLD_SIZE`` > 1) the embedding runs data-parallel.
    """
    import torch.distributed as dist

    from ..downstream.predict import load_predictor
    from ..train.distributed import barrier, cleanup, init_distributed

    out = Path(out)
    model_path = cfg.model
    dinfo = init_distributed(cfg.device or ("cuda" if _cuda() else "cpu"))
    try:
        report = BuildReport(index_dir=str(out))
        files, roots = list_inputs(inputs)
        report.total = len(files)
        if dinfo.is_main:
            out.mkdir(parents=True, exist_ok=True)
            conn = connect(out / META_FILE)
            info = read_info(conn)
            model_path = cfg.model or info.get("model", "")
            if not model_path:
                raise IndexStateError(f"{out}: a new index needs --model (a retrieval model folder or .safetensors)")
            for shard in sorted((out / SHARDS_DIR).glob("rank*.sqlite")):  # left by an interrupted distributed run
                report.merged += merge_shard(conn, shard)
            conn.close()
        if dinfo.distributed:
            box = [model_path]
            dist.broadcast_object_list(box, src=0)
            model_path = box[0]
        barrier()
        conn = connect(out / META_FILE)
        todo, report.unchanged = _todo(conn, files)
        mine = todo[dinfo.rank :: dinfo.world_size]
        known_dim = read_info(conn).get("dim")
        # an up-to-date index needs no model: re-scanning it only stats the files
        pred = load_predictor(model_path, tokenizer=cfg.tokenizer, device=dinfo.device) if mine or not known_dim else None
        dim = int(pred.model.config.embed_dim) if pred is not None else int(known_dim)
        if dinfo.is_main:
            _check_or_write_info(conn, cfg, str(Path(model_path).resolve()) if Path(model_path).exists() else model_path, dim, roots, out)
        barrier()
        if dinfo.distributed:
            (out / SHARDS_DIR).mkdir(exist_ok=True)
            target = connect(out / SHARDS_DIR / f"rank{dinfo.rank}.sqlite")
        else:
            target = conn
        desc = f"embedding (rank {dinfo.rank})" if dinfo.distributed else "embedding"
        embedded, errors = _embed_into(target, pred, mine, cfg.batch_size, cfg.progress and dinfo.is_main, desc)
        if target is not conn:
            target.close()
        per_rank: list = [(embedded, errors)]
        if dinfo.distributed:
            per_rank = [None] * dinfo.world_size
            dist.all_gather_object(per_rank, (embedded, errors))
        report.per_rank = [n for n, _ in per_rank]
        report.embedded = sum(report.per_rank)
        report.errors = [e for _, errs in per_rank for e in errs]
        if dinfo.is_main:
            for shard in sorted((out / SHARDS_DIR).glob("rank*.sqlite")):
                merge_shard(conn, shard)
            present = {str(f) for f in files}
            gone = [(rid, p) for rid, p in rows_under(conn, roots) if p not in present and not Path(p).exists()]
            with conn:
                conn.executemany("DELETE FROM images WHERE id=?", [(rid,) for rid, _ in gone])
            report.removed = len(gone)
            report.vectors, report.kind = _rebuild_vectors(conn, out, cfg, dim)
        conn.close()
        barrier()
        return report
    finally:
        cleanup(dinfo)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def embed_query(pred, text: str | None = None, image: str | os.PathLike | None = None) -> np.ndarray:
    """The (D,) query vector of a text, an image, or both (the normalised sum of the two unit vectors)."""
    from ..downstream.predict import embed_images, embed_texts

    if not text and image is None:
        raise ValueError("give a text query, an image query, or both")
    parts = []
    if text:
        parts.append(embed_texts(pred, [text])[0])
    if image is not None:
        vectors, _, errors = embed_images(pred, [image])
        if not len(vectors):
            raise ValueError(f"image query {errors[0] if errors else image}")
        parts.append(vectors[0])
    q = np.sum(parts, axis=0)
    return (q / max(float(np.linalg.norm(q)), 1e-12)).astype(np.float32)


def load_search_predictor(index_dir: str | os.PathLike, model: str | None = None, tokenizer: str | None = None, device: str | None = None):
    """The retrieval predictor an index was built with (or ``model``), for queries against it."""
    from ..downstream.predict import load_predictor
    from .store import ImageIndex

    index = ImageIndex.open(index_dir)
    model = model or index.info.get("model")
    if not model:
        raise IndexStateError(f"{index_dir}: the index does not record its model; pass --model")
    return index, load_predictor(model, tokenizer=tokenizer or index.info.get("tokenizer"), device=device or "cpu")
