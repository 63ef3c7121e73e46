"""METER downstream tasks and pre-training as :class:`~multiway.train.loop.TrainTask` objects.

Batches use BEiT-3's field names, so the same datasets and collate functions feed both systems:

* pre-training / retrieval / captioning: ``image (B,3,H,W)``, ``language_tokens (B,T)``, ``padding_mask (B,T)``
  (+ ``image_id (B,)`` for retrieval and captioning);
* VQA: + ``labels (B, num_labels)`` soft VQA scores;
* NLVR2: ``image``, ``image2``, text, ``label (B,)``.

Metrics come from :mod:`multiway.downstream.metrics` (VQA score, accuracy, retrieval R@K, COCO caption metrics).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ..data.masking import IGNORE_INDEX
from ..downstream.metrics import caption_metrics, retrieval_recall, vqa_score
from ..train.loop import MapDatasetTask
from .config import ObjectiveConfig
from .model import METERForCaptioning, METERForNLVR2, METERForPretraining, METERForRetrieval, METERForVQA
from .objectives import TextSpec, itc_logits, itc_loss, pretraining_loss


def _batches(dataset: Dataset, collate_fn: Callable | None, batch_size: int) -> Iterable[dict]:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}


# --- pre-training -----------------------------------------------------------------------------------------


def pretraining_task(
    dataset: Dataset, collate_fn: Callable | None, batch_size: int, spec: TextSpec, objectives: ObjectiveConfig,
    eval_dataset: Dataset | None = None, vqkd: Any = None,
) -> MapDatasetTask:
    """MLM/span corruption + ITM + MIM on image-text pairs; evaluation = the same losses on ``eval_dataset``."""

    def loss(model: METERForPretraining, batch: dict) -> tuple[Tensor, dict[str, float]]:
        return pretraining_loss(model, batch, spec, objectives, vqkd)

    def evaluate(model: METERForPretraining) -> dict[str, float]:
        sums: dict[str, float] = {}
        n = 0
        for batch in _batches(eval_dataset, collate_fn, batch_size):
            if batch["language_tokens"].shape[0] < 2:
                continue
            total, logs = pretraining_loss(model, _to(batch, _device(model)), spec, objectives, vqkd)
            for k, v in {"loss": total.item(), **logs}.items():
                sums[k] = sums.get(k, 0.0) + v
            n += 1
        return {k: v / max(1, n) for k, v in sums.items()}

    return MapDatasetTask(dataset, collate_fn, batch_size, loss, eval_fn=evaluate if eval_dataset is not None else None)


# --- VQA ----------------------------------------------------------------------------------------------------


def vqa_loss(model: METERForVQA, batch: dict) -> tuple[Tensor, dict[str, float]]:
    """METER's VQA loss: BCE with the soft scores, times the number of answers."""
    logits = model(batch["image"], batch["language_tokens"], batch["padding_mask"]).float()
    targets = batch["labels"].float()
    loss = F.binary_cross_entropy_with_logits(logits, targets) * targets.shape[1]
    return loss, {"vqa/score": vqa_score(logits.detach(), targets)}


def vqa_evaluate(model: METERForVQA, dataset: Dataset, collate_fn: Callable | None, batch_size: int) -> dict[str, float]:
    logits, targets = [], []
    for batch in _batches(dataset, collate_fn, batch_size):
        b = _to(batch, _device(model))
        logits.append(model(b["image"], b["language_tokens"], b["padding_mask"]).float().cpu())
        targets.append(b["labels"].float().cpu())
    return {"vqa_score": vqa_score(torch.cat(logits), torch.cat(targets))}


# --- NLVR2 --------------------------------------------------------------------------------------------------


def nlvr2_loss(model: METERForNLVR2, batch: dict) -> tuple[Tensor, dict[str, float]]:
    logits = model(batch["image"], batch["image2"], batch["language_tokens"], batch["padding_mask"]).float()
    label = batch["label"].long()
    return F.cross_entropy(logits, label), {"nlvr2/acc": (logits.argmax(-1) == label).float().mean().item()}


def nlvr2_evaluate(model: METERForNLVR2, dataset: Dataset, collate_fn: Callable | None, batch_size: int) -> dict[str, float]:
    right, n = 0, 0
    for batch in _batches(dataset, collate_fn, batch_size):
        b = _to(batch, _device(model))
        logits = model(b["image"], b["image2"], b["language_tokens"], b["padding_mask"])
        right += int((logits.argmax(-1) == b["label"]).sum())
        n += b["label"].shape[0]
    return {"nlvr2_acc": 100.0 * right / max(1, n)}


# --- retrieval ----------------------------------------------------------------------------------------------


def retrieval_loss(model: METERForRetrieval, batch: dict, num_negatives: int = 3) -> tuple[Tensor, dict[str, float]]:
    """ITC on the dual projections (trains the candidate generator) + METER's ranking loss: each text scores its
    image against ``num_negatives`` in-batch images drawn by ITC similarity (never one with the same image_id)."""
    m = model.meter
    ids, pad, image = batch["language_tokens"], batch["padding_mask"], batch["image"]
    B = ids.shape[0]
    t = m.encode_text_tokens(ids, pad)
    v = m.encode_image_tokens(image)
    sim = itc_logits(m, t[:, 0], v[:, 0])
    loss_itc = itc_loss(sim)
    same = batch["image_id"][:, None] == batch["image_id"][None, :] if "image_id" in batch else torch.eye(B, dtype=torch.bool, device=ids.device)
    k = min(num_negatives, int((~same).sum(1).min()))
    cands = [torch.arange(B, device=ids.device)]
    if k > 0:
        weights = (F.softmax(sim.detach().float(), dim=1) + 1e-8).masked_fill(same, 0.0)
        cands += list(torch.multinomial(weights, k).t())
    scores = torch.stack([model.score(t, v[c], pad) for c in cands], dim=1).float()  # (B, 1 + k)
    loss_rank = F.cross_entropy(scores, torch.zeros(B, dtype=torch.long, device=ids.device))
    return loss_itc + loss_rank, {"ret/itc": loss_itc.item(), "ret/rank": loss_rank.item()}


@torch.no_grad()
def retrieval_evaluate(
    model: METERForRetrieval, dataset: Dataset, collate_fn: Callable | None, batch_size: int, k: int = 8
) -> dict[str, float]:
    """Dual-encoder candidates, fusion re-ranking of the top ``k`` in both directions; R@1/5/10 as BEiT-3.

    Every text is one item; images are de-duplicated by ``image_id``. Scores outside the top ``k`` keep their
    dual similarity minus a constant, so the re-ranked candidates always come first.
    """
    dev = _device(model)
    m = model.meter
    texts, pads, text_img, images, image_ids = [], [], [], [], []
    seen: set[int] = set()
    for batch in _batches(dataset, collate_fn, batch_size):
        for i in range(batch["language_tokens"].shape[0]):
            iid = int(batch["image_id"][i])
            texts.append(batch["language_tokens"][i])
            pads.append(batch["padding_mask"][i])
            text_img.append(iid)
            if iid not in seen:
                seen.add(iid)
                images.append(batch["image"][i])
                image_ids.append(iid)
    ids, pad = torch.stack(texts).to(dev), torch.stack(pads).to(dev)
    img = torch.stack(images).to(dev)
    t_tok = torch.cat([m.encode_text_tokens(ids[s : s + batch_size], pad[s : s + batch_size]) for s in range(0, len(ids), batch_size)])
    v_tok = torch.cat([m.encode_image_tokens(img[s : s + batch_size]) for s in range(0, len(img), batch_size)])
    dual = m.dual_embed_image(v_tok) @ m.dual_embed_text(t_tok).t()  # (I, T)

    def fused(img_rows: Tensor, txt_rows: Tensor) -> Tensor:
        out = []
        for s in range(0, len(img_rows), batch_size):
            ii, tt = img_rows[s : s + batch_size], txt_rows[s : s + batch_size]
            out.append(model.score(t_tok[tt], v_tok[ii], pad[tt]).float())
        return torch.cat(out)

    I, T = dual.shape
    ki, kt = min(k, I), min(k, T)
    # text -> image: re-rank each text's top-k images
    s_t2i = dual.clone() - 1e4
    top_i = dual.topk(ki, dim=0).indices  # (ki, T)
    rows, cols = top_i.flatten(), torch.arange(T, device=dev).repeat(ki)
    s_t2i[rows, cols] = fused(rows, cols)
    # image -> text: re-rank each image's top-k texts
    s_i2t = dual.clone() - 1e4
    top_t = dual.topk(kt, dim=1).indices  # (I, kt)
    rows, cols = torch.arange(I, device=dev).repeat_interleave(kt), top_t.flatten()
    s_i2t[rows, cols] = fused(rows, cols)
    image_ids_t = torch.tensor(image_ids, device=dev)
    text_img_t = torch.tensor(text_img, device=dev)
    eye = torch.eye(T, device=dev)  # retrieval_recall scores image_feats @ text_feats.T: pass the score matrix
    ir = retrieval_recall(s_t2i, image_ids_t, eye, text_img_t)
    tr = retrieval_recall(s_i2t, image_ids_t, eye, text_img_t)
    out = {key: v for key, v in ir.items() if key.startswith("ir_")}
    out.update({key: v for key, v in tr.items() if key.startswith("tr_")})
    out["average"] = (out["ir_mean"] + out["tr_mean"]) / 2
    dual_only = retrieval_recall(dual, image_ids_t, eye, text_img_t)
    out["dual_average"] = dual_only["average"]
    return out


# --- captioning ---------------------------------------------------------------------------------------------


def captioning_loss(model: METERForCaptioning, batch: dict) -> tuple[Tensor, dict[str, float]]:
    """Teacher-forced next-token loss on ``<s> caption </s>`` (pads ignored)."""
    ids, pad = batch["language_tokens"], batch["padding_mask"].bool()
    logits = model(batch["image"], ids[:, :-1], pad[:, :-1]).float()
    labels = ids[:, 1:].masked_fill(pad[:, 1:], IGNORE_INDEX)
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
    hit = labels != IGNORE_INDEX
    return loss, {"cap/acc": (logits.argmax(-1)[hit] == labels[hit]).float().mean().item()}


@torch.no_grad()
def captioning_evaluate(
    model: METERForCaptioning,
    dataset: Dataset,
    collate_fn: Callable | None,
    batch_size: int,
    decode: Callable[[Sequence[int]], str],
    max_len: int = 20,
    metrics_fn: Callable[[dict, dict], dict[str, float]] | None = None,
) -> dict[str, float]:
    """Greedy captions for each distinct image, scored against all its captions (BLEU-4, CIDEr, ...)."""
    dev = _device(model)
    refs: dict[int, list[str]] = {}
    preds: dict[int, str] = {}
    for batch in _batches(dataset, collate_fn, batch_size):
        iids = [int(i) for i in batch["image_id"]]
        for i, iid in enumerate(iids):
            refs.setdefault(iid, []).append(decode(batch["language_tokens"][i].tolist()))
        todo = [i for i, iid in enumerate(iids) if iid not in preds and iids.index(iid) == i]
        if not todo:
            continue
        gen = model.generate(batch["image"][todo].to(dev), max_len=max_len)
        for i, row in zip(todo, gen.tolist()):
            preds[iids[i]] = decode(row) or "."
    scores = (metrics_fn or caption_metrics)(preds, refs)
    return {"cider": 100.0 * scores["CIDEr"], "bleu4": 100.0 * scores["Bleu_4"]}


def fast_caption_metrics(predictions: dict, references: dict) -> dict[str, float]:
    """BLEU-4 and CIDEr from pycocoevalcap with lower-case whitespace tokenisation: no Java (PTB tokenizer,
    METEOR), so a tiny study does not spend most of its time in JVM start-up. Use :func:`caption_metrics` for
    reportable numbers."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    res = {k: [" ".join(str(v).lower().split())] for k, v in predictions.items()}
    gts = {k: [" ".join(r.lower().split()) for r in references[k]] for k in predictions}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return {"Bleu_4": float(bleu[3]), "CIDEr": float(cider)}


# --- task factories -----------------------------------------------------------------------------------------


def downstream_task(
    name: str,
    train_set: Dataset,
    eval_set: Dataset,
    collate_fn: Callable | None,
    batch_size: int,
    decode: Callable[[Sequence[int]], str] | None = None,
    caption_metrics_fn: Callable[[dict, dict], dict[str, float]] | None = None,
) -> MapDatasetTask:
    """A fine-tuning TrainTask for ``name`` in ("vqa", "nlvr2", "retrieval", "captioning")."""
    losses = {"vqa": vqa_loss, "nlvr2": nlvr2_loss, "retrieval": retrieval_loss, "captioning": captioning_loss}
    if name not in losses:
        raise ValueError(f"task={name!r} is not supported; accepted values: {', '.join(losses)}")
    if name == "vqa":
        ev = lambda model: vqa_evaluate(model, eval_set, collate_fn, batch_size)  # noqa: E731
    elif name == "nlvr2":
        ev = lambda model: nlvr2_evaluate(model, eval_set, collate_fn, batch_size)  # noqa: E731
    elif name == "retrieval":
        ev = lambda model: retrieval_evaluate(model, eval_set, collate_fn, batch_size)  # noqa: E731
    else:
        if decode is None:
            raise ValueError("captioning evaluation needs decode= (the tokenizer's id -> text function)")
        ev = lambda model: captioning_evaluate(model, eval_set, collate_fn, batch_size, decode, metrics_fn=caption_metrics_fn)  # noqa: E731
    return MapDatasetTask(train_set, collate_fn, batch_size, losses[name], eval_fn=ev)


TASK_MODELS = {"vqa": METERForVQA, "nlvr2": METERForNLVR2, "retrieval": METERForRetrieval, "captioning": METERForCaptioning}
