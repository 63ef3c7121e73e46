"""The on-disk image index: SQLite metadata beside a FAISS vector index.

A folder ``DIR`` holds

* ``meta.sqlite``: one row per image file (absolute path, mtime in ns, size in bytes, ``ok`` or ``error`` with the
  reason, and for ``ok`` its float32 unit vector), plus an ``info`` table (model, dimension, roots, index kind).
  Rows are committed batch by batch, so a killed build keeps every finished batch; the float32 copy is the master
  from which the FAISS index is (re)built and an IVF-PQ index retrained;
* ``vectors.faiss``: the search structure over the ``ok`` rows, keyed by their row id. Exact inner product
  (``IndexFlatIP``) by default; IVF-PQ (``IVF{nlist},PQ{m}x{nbits}``, inner product, m = D/8) at or above a size threshold
  or on request. It is written atomically at the end of a build or add.

Vectors are unit-norm, so inner product is cosine similarity.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

META_FILE, VECTORS_FILE, SHARDS_DIR = "meta.sqlite", "vectors.faiss", "shards"
IVFPQ_MIN_VECTORS = 256  # fewer cannot train the product quantizer's codebooks

_SCHEMA = """
CREATE TABLE IF NOT EXISTS info (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY,
    path TEXT UNIQUE NOT NULL,
    mtime_ns INTEGER NOT NULL,
    size INTEGER NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('ok', 'error')),
    error TEXT,
    vector BLOB,
    added REAL NOT NULL
);
"""


class IndexStateError(ValueError):
    """An index folder that is missing, incomplete or inconsistent (the message says which and what to run)."""


@dataclass
class Hit:
    """One search result: the row id, the image's absolute path and its cosine similarity to the query."""

    id: int
    path: str
    score: float

    def to_dict(self) -> dict:
        return {"id": self.id, "path": self.path, "score": round(self.score, 4)}


def connect(path: str | os.PathLike) -> sqlite3.Connection:
    """Open (creating) a metadata database. WAL lets searches read while a build writes; a process killed
    mid-transaction loses only that transaction."""
    conn = sqlite3.connect(str(path), timeout=60)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.executescript(_SCHEMA)
    return conn


def file_key(path: Path) -> tuple[int, int]:
    """(mtime_ns, size): a file whose key changed is embedded again."""
    st = path.stat()
    return st.st_mtime_ns, st.st_size


def write_rows(conn: sqlite3.Connection, rows: Iterable[tuple[str, int, int, str, str | None, np.ndarray | None]]) -> None:
    """Insert or replace (path, mtime_ns, size, status, error, vector) rows in one transaction."""
    now = time.time()
    with conn:
        conn.executemany(
            "INSERT INTO images (path, mtime_ns, size, status, error, vector, added) VALUES (?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT(path) DO UPDATE SET mtime_ns=excluded.mtime_ns, size=excluded.size, status=excluded.status, "
            "error=excluded.error, vector=excluded.vector, added=excluded.added",
            [(p, m, s, st, err, None if v is None else np.ascontiguousarray(v, np.float32).tobytes(), now)
             for p, m, s, st, err, v in rows])


def merge_shard(conn: sqlite3.Connection, shard: Path) -> int:
    """Copy the rows of a rank's shard database into ``conn`` (newer rows win) and delete the shard. Returns rows."""
    src = sqlite3.connect(str(shard), timeout=60)
    try:
        rows = src.execute("SELECT path, mtime_ns, size, status, error, vector FROM images").fetchall()
    finally:
        src.close()
    now = time.time()
    with conn:
        conn.executemany(
            "INSERT INTO images (path, mtime_ns, size, status, error, vector, added) VALUES (?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT(path) DO UPDATE SET mtime_ns=excluded.mtime_ns, size=excluded.size, status=excluded.status, "
            "error=excluded.error, vector=excluded.vector, added=excluded.added",
            [(*r, now) for r in rows])
    for suffix in ("", "-wal", "-shm"):
        Path(str(shard) + suffix).unlink(missing_ok=True)
    return len(rows)


def _ivfpq_factory(n: int, dim: int, nlist: int = 0, pq_m: int = 0) -> str:
    """The FAISS factory string of an IVF-PQ index for ``n`` vectors of ``dim``: about 4 sqrt(n) lists (at least 39
    training points each), ``m`` sub-quantizers of 8 dimensions (a divisor of ``dim``), 8-bit codes when there are
    enough points to train 256 centroids well, fewer bits below that. ``np``: no polysemous training (it only serves
    Hamming-distance filtering, which this index does not use, and costs minutes)."""
    if n < IVFPQ_MIN_VECTORS:
        raise IndexStateError(f"an IVF-PQ index needs at least {IVFPQ_MIN_VECTORS} vectors to train, got {n}; use kind=flat")
    nlist = nlist or max(1, min(int(4 * math.sqrt(n)), n // 39))
    if not pq_m:
        pq_m = max(d for d in range(1, dim + 1) if dim % d == 0 and d <= max(1, dim // 8))
    if dim % pq_m:
        raise IndexStateError(f"pq_m={pq_m} must divide the embedding dimension {dim}")
    nbits = int(min(8, max(4, math.floor(math.log2(n / 39)))))
    return f"IVF{nlist},PQ{pq_m}x{nbits}np"


def build_faiss(ids: np.ndarray, vectors: np.ndarray, kind: str = "flat", nlist: int = 0, pq_m: int = 0, nprobe: int = 16):
    """A FAISS inner-product index over ``vectors`` (N, D) float32 with the int64 ``ids``; ``kind``: flat | ivfpq."""
    import faiss

    n, dim = vectors.shape
    vectors = np.ascontiguousarray(vectors, np.float32)
    if kind == "flat":
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    elif kind == "ivfpq":
        index = faiss.index_factory(dim, _ivfpq_factory(n, dim, nlist, pq_m), faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
        faiss.extract_index_ivf(index).nprobe = min(nprobe, faiss.extract_index_ivf(index).nlist)
    else:
        raise IndexStateError(f"unknown index kind {kind!r}; expected flat or ivfpq")
    if n:
        index.add_with_ids(vectors, np.ascontiguousarray(ids, np.int64))
    return index


class ImageIndex:
    """An index folder opened for search (and for the server: which files it may serve).

    >>> index = ImageIndex.open("photos.index")
    >>> index.search(query_vectors, k=5)      # [[Hit(id, path, score), ...] per query]
    """

    def __init__(self, root: Path, conn: sqlite3.Connection, faiss_index, info: dict):
        self.root, self.conn, self.faiss_index, self.info = root, conn, faiss_index, info
        self.roots = [Path(r) for r in info.get("roots", [])]

    @classmethod
    def open(cls, root: str | os.PathLike) -> ImageIndex:
        """Open ``root`` read-only for search; refuses a folder whose vectors and metadata disagree."""
        import faiss

        root = Path(root)
        meta, vectors = root / META_FILE, root / VECTORS_FILE
        if not meta.is_file():
            raise IndexStateError(f"{root}: not an index folder (no {META_FILE}); "
                                  f"create one with `multiway index build IMAGES --model M --out {root}`")
        conn = sqlite3.connect(f"file:{meta}?mode=ro", uri=True, timeout=60, check_same_thread=False)
        info = read_info(conn)
        ok = conn.execute("SELECT COUNT(*) FROM images WHERE status='ok'").fetchone()[0]
        if not vectors.is_file():
            raise IndexStateError(f"{root}: {VECTORS_FILE} is missing ({ok} embedded images in {META_FILE}; was the build killed?): "
                              f"run `multiway index add {root}` to finish it")
        index = faiss.read_index(str(vectors))
        if index.ntotal != ok:
            raise IndexStateError(f"{root}: {VECTORS_FILE} holds {index.ntotal} vectors but {META_FILE} has {ok} embedded images "
                              f"(an interrupted build or add): run `multiway index add {root}` to finish it")
        return cls(root, conn, index, info)

    def __len__(self) -> int:
        return int(self.faiss_index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.faiss_index.d)

    def search(self, queries: np.ndarray, k: int = 5) -> list[list[Hit]]:
        """Top-``k`` images per query: ``queries`` (Q, D) float32 unit vectors -> Q lists of :class:`Hit`."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), np.float32)
        if queries.shape[1] != self.dim:
            raise ValueError(f"query vectors have dimension {queries.shape[1]}, the index has {self.dim}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if not len(self):
            return [[] for _ in range(len(queries))]
        scores, ids = self.faiss_index.search(queries, min(k, len(self)))
        paths = self.paths_of({int(i) for i in ids.ravel() if i >= 0})
        return [[Hit(int(i), paths[int(i)], float(s)) for s, i in zip(srow, irow) if i >= 0] for srow, irow in zip(scores, ids)]

    def paths_of(self, ids: Iterable[int]) -> dict[int, str]:
        ids = list(ids)
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        return dict(self.conn.execute(f"SELECT id, path FROM images WHERE id IN ({marks})", ids).fetchall())

    def path_of(self, image_id: int) -> str | None:
        row = self.conn.execute("SELECT path FROM images WHERE id=? AND status='ok'", (image_id,)).fetchone()
        return row[0] if row else None

    def contains_path(self, path: str) -> bool:
        return self.conn.execute("SELECT 1 FROM images WHERE path=? AND status='ok'", (path,)).fetchone() is not None

    def inside_roots(self, path: Path) -> bool:
        """Whether ``path`` (already resolved) is one of the indexed roots or lies inside one."""
        return any(path == r or path.is_relative_to(r) for r in self.roots)

    def errors(self) -> list[tuple[str, str]]:
        return self.conn.execute("SELECT path, error FROM images WHERE status='error' ORDER BY path").fetchall()


def read_info(conn: sqlite3.Connection) -> dict:
    return {k: json.loads(v) for k, v in conn.execute("SELECT key, value FROM info").fetchall()}


def write_info(conn: sqlite3.Connection, info: dict) -> None:
    with conn:
        conn.executemany("INSERT OR REPLACE INTO info (key, value) VALUES (?, ?)", [(k, json.dumps(v)) for k, v in info.items()])


def load_vectors(conn: sqlite3.Connection, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids (N,) int64, vectors (N, D) float32) of every embedded row, in id order."""
    rows = conn.execute("SELECT id, vector FROM images WHERE status='ok' ORDER BY id").fetchall()
    ids = np.array([r[0] for r in rows], np.int64)
    vectors = np.frombuffer(b"".join(r[1] for r in rows), np.float32).reshape(len(rows), dim) if rows else np.zeros((0, dim), np.float32)
    return ids, vectors


def write_faiss(root: Path, index) -> Path:
    """Write ``vectors.faiss`` atomically (a reader never sees half a file)."""
    import faiss

    target = root / VECTORS_FILE
    tmp = root / f".{VECTORS_FILE}.partial"
    faiss.write_index(index, str(tmp))
    os.replace(tmp, target)
    return target


def rows_under(conn: sqlite3.Connection, roots: Sequence[Path]) -> list[tuple[int, str]]:
    """(id, path) of the rows whose path is one of ``roots`` or inside one."""
    out = []
    for rid, p in conn.execute("SELECT id, path FROM images").fetchall():
        path = Path(p)
        if any(path == r or path.is_relative_to(r) for r in roots):
            out.append((rid, p))
    return out
