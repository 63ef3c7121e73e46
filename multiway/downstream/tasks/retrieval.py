"""Image-text retrieval with the dual encoder (COCO and Flickr30k): contrastive fine-tuning, R@1/5/10 both ways;
embedding and search of the user's images and texts."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from ...constants import INDEX_FILES
from ...data.index_dataset import IndexDataset
from .. import metrics
from ..inference import Predictor, Result, encode_texts, image_batches, list_images, print_result, require
from .base import DataSettings, DownstreamTask, EvalSettings, PredictCommand


class RetrievalDataset(IndexDataset):
    """``{coco_retrieval,flickr30k}.{split}.jsonl`` lines ``{image_path, text_segment, image_id}`` ->
    {image (3,S,S), language_tokens (T,), padding_mask (T,), image_id}; one item per caption, ``image_id`` the
    running image index within the split."""

    required = ("image_path", "text_segment", "image_id")

    def load(self, item: dict[str, Any], index: int) -> dict[str, Any]:
        ids, pad, _ = self._text(item)
        return {"image": self._image(item["image_path"], item), "language_tokens": ids, "padding_mask": pad,
                "image_id": int(item["image_id"])}


# --- prediction on user files ---------------------------------------------------------------------------------


@torch.no_grad()
def embed_images(pred: Predictor, inputs: Iterable[str], batch_size: int = 32) -> tuple[np.ndarray, list[str], list[str]]:
    """Dual-encoder image embeddings: (N, D) float32 unit vectors, their paths, and the errors."""
    require(pred, CocoRetrieval.head)
    result, feats, paths = Result(), [], []
    for images, ok in image_batches(pred, list_images(inputs), batch_size, result):
        feats.append(pred.model.encode_image(images).float().cpu())
        paths.extend(str(p) for p in ok)
    dim = pred.model.config.embed_dim
    return (torch.cat(feats).numpy() if feats else np.zeros((0, dim), np.float32)), paths, result.errors


@torch.no_grad()
def embed_texts(pred: Predictor, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """Dual-encoder text embeddings: (N, D) float32 unit vectors."""
    require(pred, CocoRetrieval.head, tokenizer=True)
    feats = []
    for i in range(0, len(texts), batch_size):
        ids, pad = encode_texts(pred, texts[i : i + batch_size])
        feats.append(pred.model.encode_text(ids, pad).float().cpu())
    return torch.cat(feats).numpy() if feats else np.zeros((0, pred.model.config.embed_dim), np.float32)


def save_embeddings(path: str | Path, embeddings: np.ndarray, names: Sequence[str]) -> tuple[Path, Path]:
    """Write ``<path>.npy`` (N, D) and ``<path>.txt`` (the N names, one a line, same order)."""
    base = Path(path)
    base = base.with_suffix("") if base.suffix == ".npy" else base
    base.parent.mkdir(parents=True, exist_ok=True)
    np.save(base.with_suffix(".npy"), embeddings.astype(np.float32))
    base.with_suffix(".txt").write_text("".join(f"{n}\n" for n in names))
    return base.with_suffix(".npy"), base.with_suffix(".txt")


@dataclass
class SearchIndex:
    """Unit-norm image embeddings (N, D) with their paths."""

    embeddings: np.ndarray
    paths: list[str]

    def save(self, path: str | Path) -> Path:
        return save_embeddings(path, self.embeddings, self.paths)[0]

    @classmethod
    def load(cls, path: str | Path) -> SearchIndex:
        base = Path(path).with_suffix("")
        emb = np.load(base.with_suffix(".npy"))
        paths = base.with_suffix(".txt").read_text().splitlines()
        if len(paths) != emb.shape[0]:
            raise ValueError(f"{base}.npy has {emb.shape[0]} rows but {base}.txt names {len(paths)} images")
        return cls(emb, paths)


def build_index(pred: Predictor, inputs: Iterable[str], batch_size: int = 32) -> Result:
    """Embed a folder of images for search: rows ``{"path"}`` of the indexed images, ``output`` the
    :class:`SearchIndex` (save it with ``result.output.save(path)``), errors the skipped files."""
    emb, paths, errors = embed_images(pred, inputs, batch_size)
    return Result(rows=[{"path": p} for p in paths], errors=errors, output=SearchIndex(emb, paths))


def search_text(pred: Predictor, index: SearchIndex, query: str, k: int = 5) -> Result:
    """Top-``k`` images of ``index`` for a text query: rows ``{"path", "score"}`` by cosine similarity, best first."""
    q = embed_texts(pred, [query])[0]
    scores = index.embeddings @ q
    order = np.argsort(-scores)[:k]
    return Result(rows=[{"path": index.paths[i], "score": round(float(scores[i]), 4)} for i in order])


def search_image(pred: Predictor, image: str | Path, texts: Sequence[str], k: int = 5) -> Result:
    """The reverse: top-``k`` of ``texts`` for an image query: one row ``{"path", "hits": [{"text", "score"}]}``."""
    emb, paths, errors = embed_images(pred, [image])
    result = Result(errors=errors)
    if not paths:
        return result
    t = embed_texts(pred, texts)
    scores = t @ emb[0]
    order = np.argsort(-scores)[:k]
    result.rows.append({"path": paths[0], "hits": [{"text": texts[i], "score": round(float(scores[i]), 4)} for i in order]})
    return result


def _read_lines(path: str) -> list[str]:
    return [t for t in Path(path).read_text().splitlines() if t.strip()]


def _embed_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", nargs="+", help="image files or folders")
    parser.add_argument("--texts", help="a text file, one text a line")
    parser.add_argument("--out", default="embeddings", help="output folder")


def _embed_run(args: argparse.Namespace, pred: Predictor) -> int:
    out, errors = [], []
    if args.images:
        emb, paths, errors = embed_images(pred, args.images)
        for e in errors:
            print(f"skipped: {e}", file=sys.stderr)
        out.append(save_embeddings(Path(args.out) / "images", emb, paths)[0])
    if args.texts:
        texts = _read_lines(args.texts)
        out.append(save_embeddings(Path(args.out) / "texts", embed_texts(pred, texts), texts)[0])
    if not out:
        raise SystemExit("embed: give --images and/or --texts")
    print("\n".join(f"wrote {p}" for p in out))
    return 1 if errors and args.strict else 0


def _search_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", nargs="+", help="image files or folders to index")
    parser.add_argument("--index", help="save the index here (or load it when --images is not given)")
    parser.add_argument("--query", help="text query")
    parser.add_argument("--image-query", dest="image_query", help="image query (the reverse direction)")
    parser.add_argument("--texts", help="candidate texts for --image-query, one a line")
    parser.add_argument("--topk", type=int, default=5)


def _search_run(args: argparse.Namespace, pred: Predictor) -> int:
    if args.index and Path(args.index).with_suffix(".npy").is_file() and not args.images:
        index = SearchIndex.load(args.index)
    else:
        if not args.images:
            raise SystemExit("search: give --images (a folder to index) or an existing --index")
        built = build_index(pred, args.images)
        index, errors = built.output, built.errors
        for e in errors:
            print(f"skipped: {e}", file=sys.stderr)
        if errors and args.strict:
            return 1
        if args.index:
            print(f"index saved to {index.save(args.index)}")
    if args.query:
        for hit in search_text(pred, index, args.query, k=args.topk).rows:
            print(json.dumps(hit) if args.json else f"{hit['score']:.4f}  {hit['path']}")
    if args.image_query:
        if not args.texts:
            raise SystemExit("search --image-query needs --texts (a file of candidate texts, one a line)")
        return print_result(search_image(pred, args.image_query, _read_lines(args.texts), k=args.topk), args.json, args.strict)
    return 0


# --- the task ---------------------------------------------------------------------------------------------------


class CocoRetrieval(DownstreamTask):
    """Image-text retrieval on COCO (Karpathy splits): the dual encoder's [CLS] projections, the contrastive loss
    with in-batch negatives (gathered across ranks), recall@1/5/10 of image and text retrieval; the headline
    ``r@1`` is their mean."""

    name = "coco_retrieval"
    head = "retrieval"
    metric, metric_label = "r@1", "R@1 (IR+TR)/2"
    splits = INDEX_FILES["coco_retrieval"]
    recipe = "finetune_coco_retrieval_base.yaml"
    find_unused_parameters = True
    zero_shot_from_pretraining = True
    predict_commands = (
        PredictCommand("embed", "dual-encoder embeddings to .npy (+ .txt of names)", _embed_arguments, _embed_run),
        PredictCommand("search", "index a folder of images; top-k for a text query, or texts for an image", _search_arguments,
                       _search_run),
    )

    def predict(self, predictor: Predictor, images: Any = None, text: Any = None, **options: Any) -> Result:
        """Embeddings, or scores when both are given. ``images`` alone: rows ``{"path"}``, ``output`` the (N, D) unit
        image embeddings; ``text`` alone: rows ``{"text"}``, ``output`` the (N, D) text embeddings; both: one row per
        image ``{"path", "hits": [{"text", "score"}]}`` (best first), ``output`` the (N_images, N_texts) cosine scores."""
        if images is None and text is None:
            raise TypeError("retrieval predict needs images=, text= or both")
        texts = [text] if isinstance(text, str) else (list(text) if text is not None else None)
        if images is None:
            return Result(rows=[{"text": t} for t in texts], output=embed_texts(predictor, texts, **options))
        emb, paths, errors = embed_images(predictor, images, **options)
        if texts is None:
            return Result(rows=[{"path": p} for p in paths], errors=errors, output=emb)
        scores = emb @ embed_texts(predictor, texts).T
        rows = [{"path": p, "hits": [{"text": texts[j], "score": round(float(scores[i, j]), 4)} for j in np.argsort(-scores[i])]}
                for i, p in enumerate(paths)]
        return Result(rows=rows, errors=errors, output=scores)

    def build_dataset(self, split: str, data: DataSettings) -> Dataset:
        return RetrievalDataset(data.data_dir, split, self.index_files(split), self.image_transform(split, data), tokenizer=data.tokenizer,
                                max_len=data.max_text_len, on_error=data.on_error)

    def loss(self, model: nn.Module, batch: dict[str, Any], step: int = 0) -> tuple[Tensor, dict[str, float]]:
        loss, _, _ = model(image=batch["image"], text_description=batch["language_tokens"], padding_mask=batch["padding_mask"])
        return loss, {"logit_scale": getattr(model, "module", model).logit_scale.exp().item()}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, dataset: Dataset, settings: EvalSettings | None = None) -> dict[str, float]:
        def outputs(model: nn.Module, batch: dict[str, Any]) -> dict[str, Tensor]:
            return {"image": model.encode_image(batch["image"]).float(),
                    "text": model.encode_text(batch["language_tokens"], batch["padding_mask"]).float(), "image_id": batch["image_id"]}

        out = self.gather_outputs(model, dataset, settings or EvalSettings(), outputs)
        ids = out["image_id"]
        r = metrics.retrieval_recall(out["image"], ids, out["text"], ids)
        r["r@1"] = (r["ir_r@1"] + r["tr_r@1"]) / 2
        return r

    def chance_level(self, train_set: Dataset, test_set: Dataset) -> float:
        """Expected R@1 of a random ranking: 1 / images for image retrieval, the share of each image's own texts
        among all texts for text retrieval; their mean."""
        per_image = Counter(i["image_id"] for i in test_set.items)
        num_images, num_texts = len(per_image), len(test_set.items)
        ir = 100.0 / num_images
        tr = 100.0 * sum(c / num_texts for c in per_image.values()) / num_images
        return (ir + tr) / 2


class Flickr30k(CocoRetrieval):
    """Image-text retrieval on Flickr30k (Karpathy splits); as :class:`CocoRetrieval`."""

    name = "flickr30k"
    splits = INDEX_FILES["flickr30k"]
    recipe = "finetune_flickr30k_base.yaml"


__all__ = ["CocoRetrieval", "Flickr30k", "RetrievalDataset", "SearchIndex", "build_index", "embed_images", "embed_texts",
           "save_embeddings", "search_image", "search_text"]
