"""Image collections as a searchable index: FAISS vectors beside SQLite metadata, built incrementally.

>>> from multiway.index import IndexConfig, build_index, ImageIndex
>>> build_index(["photos/"], "photos.index", IndexConfig(model="runs/retrieval"))   # BuildReport
>>> ImageIndex.open("photos.index").search(query_vectors, k=5)

See :mod:`multiway.index.store` for the folder layout and :mod:`multiway.index.build` for build/add/resume and the
data-parallel build under ``torchrun``.
"""

from .build import BuildReport, IndexConfig, build_index, embed_query, list_inputs, load_search_predictor
from .store import Hit, ImageIndex, IndexStateError, build_faiss

__all__ = [
    "BuildReport",
    "Hit",
    "ImageIndex",
    "IndexConfig",
    "IndexStateError",
    "build_faiss",
    "build_index",
    "embed_query",
    "list_inputs",
    "load_search_predictor",
]
