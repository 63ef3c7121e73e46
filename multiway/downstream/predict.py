"""Inference on the user's own files: caption, answer, classify, judge (NLVR2), classify texts, embed and search.

Every function takes a :class:`Predictor` (a task model with its tokenizer, labels and image transform, see
:func:`load_predictor`) and file paths or folders. Images that cannot be read are reported by name in the
result's ``errors`` and skipped; the rest are still processed. Each function lives in its task's module of
:mod:`multiway.downstream.tasks` (with its ``multiway predict`` sub-command); this module gathers them.

>>> p = load_predictor("runs/captioning")            # a `multiway finetune` output folder (or a .safetensors)
>>> caption(p, ["photos/"]).rows                      # [{"path": "photos/a.jpg", "caption": "..."}]
"""

from __future__ import annotations

from .inference import IMAGE_EXTENSIONS, Predictor, Result, list_images, load_predictor, read_images, read_labels
from .tasks.captioning import caption
from .tasks.imagenet import classify
from .tasks.nlvr2 import judge
from .tasks.retrieval import SearchIndex, build_index, embed_images, embed_texts, save_embeddings, search_image, search_text
from .tasks.text_classification import classify_texts
from .tasks.vqav2 import answer

__all__ = [
    "IMAGE_EXTENSIONS",
    "Predictor",
    "Result",
    "SearchIndex",
    "answer",
    "build_index",
    "caption",
    "classify",
    "classify_texts",
    "embed_images",
    "embed_texts",
    "judge",
    "list_images",
    "load_predictor",
    "read_images",
    "read_labels",
    "save_embeddings",
    "search_image",
    "search_text",
]
