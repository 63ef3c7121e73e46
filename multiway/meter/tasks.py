"""METER's downstream tasks on the shared :class:`~multiway.downstream.tasks.DownstreamTask` interface, and its
pre-training as a :class:`~multiway.train.task.TrainTask`.

Each task class reuses the BEiT-3 task of the same data (its index files, datasets and collation) and brings
METER's head, loss and evaluation; ``build_model`` puts the head on a (pretrained) METER model. They are registered
in the one task registry under the official names (``get_task("vqav2", "meter")``, see
:data:`multiway.downstream.tasks.FAMILY_TASKS`), so ``multiway finetune vqav2 model.preset=meter_...`` trains them.
Batches use BEiT-3's field names, so the same datasets and collate functions feed both systems:

* pre-training / retrieval / captioning: ``image (B,3,H,W)``, ``language_tokens (B,T)``, ``padding_mask (B,T)``
  (+ ``image_id (B,)`` for retrieval and captioning);
* VQA: + ``labels (B, num_labels)`` soft VQA scores;
* NLVR2: ``image``, ``image2``, text, ``label (B,)``.

Metrics come from :mod:`multiway.downstream.metrics` (VQA score, accuracy, retrieval R@K, COCO caption metrics).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..data.masking import IGNORE_INDEX
from ..downstream.metrics import caption_metrics, retrieval_recall, vqa_score
from ..downstream.tasks.base import DataSettings, DownstreamTask, EvalSettings, PredictCommand
from ..downstream.tasks.captioning import caption_arguments
from ..downstream.tasks.nlvr2 import NLVR2
from ..downstream.tasks.retrieval import CocoRetrieval
from ..downstream.tasks.vqav2 import VQAv2
from ..train import MapDatasetTask
from .config import MeterConfig, ObjectiveConfig
from .family import METERFamily
from .model import METERForCaptioning, METERForNLVR2, METERForPretraining, METERForRetrieval, METERForVQA, METERModel
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
    sim = itc_logits(m, t, v, pad)
    loss_itc = itc_loss(sim)
    if "image_id" in batch:
        same = batch["image_id"][:, None] == batch["image_id"][None, :]
    else:
        same = torch.eye(B, dtype=torch.bool, device=ids.device)
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
    dual = m.dual_embed_image(v_tok) @ m.dual_embed_text(t_tok, pad).t()  # (I, T)

    def fused(img_rows: Tensor, txt_rows: Tensor) -> Tensor:
        out = []
        for s in range(0, len(img_rows), batch_size):
            ii, tt = img_rows[s : s + batch_size], txt_rows[s : s + batch_size]
            out.append(model.score(t_tok[tt], v_tok[ii], pad[tt]).float())
        return torch.cat(out)

    num_images, T = dual.shape
    ki, kt = min(k, num_images), min(k, T)
    # text -> image: re-rank each text's top-k images
    s_t2i = dual.clone() - 1e4
    top_i = dual.topk(ki, dim=0).indices  # (ki, T)
    rows, cols = top_i.flatten(), torch.arange(T, device=dev).repeat(ki)
    s_t2i[rows, cols] = fused(rows, cols)
    # image -> text: re-rank each image's top-k texts
    s_i2t = dual.clone() - 1e4
    top_t = dual.topk(kt, dim=1).indices  # (num_images, kt)
    rows, cols = torch.arange(num_images, device=dev).repeat_interleave(kt), top_t.flatten()
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


@torch.no_grad()
def meter_caption(pred: Any, inputs: Any, max_len: int | None = None, batch_size: int = 16) -> Any:
    """Greedy captions of METER's encoder-decoder for every image: rows ``{"path", "caption"}`` (the
    :class:`~multiway.downstream.inference.Result` of BEiT-3's ``caption``); ``max_len`` defaults to the run's
    ``max_gen_len``."""
    from ..downstream.inference import Result, image_batches, list_images, require

    require(pred, METERCaptioning, tokenizer=True)
    max_len = max_len or pred.downstream.options.max_gen_len
    result = Result()
    for images, ok in image_batches(pred, list_images(inputs), batch_size, result):
        for path, row in zip(ok, pred.model.generate(images, max_len=max_len).tolist()):
            result.rows.append({"path": str(path), "caption": pred.tokenizer.decode(row)})
    return result


def _meter_caption_run(args: Any, pred: Any) -> int:
    from ..downstream.inference import print_result

    if getattr(args, "num_beams", None) not in (None, 1):
        raise ValueError(f"--num-beams {args.num_beams}: METER's captioning decodes greedily; leave --num-beams out")
    return print_result(meter_caption(pred, args.inputs, max_len=args.max_len), args.json, args.strict)


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


# --- the tasks on the DownstreamTask interface ----------------------------------------------------------------


@dataclass
class METERTaskOptions:
    """Settings shared by METER's tasks."""

    # False: training images get the evaluation transform (squash-resize), as the built-in data's texts name
    # places and colours that crops and flips would change; True: the vision-language training views
    train_augment: bool = False


@dataclass
class METERRetrievalOptions(METERTaskOptions):
    rerank_top_k: int = 8  # evaluation: fusion re-ranking of each query's top-k dual-encoder candidates
    num_negatives: int = 3  # training: in-batch negatives per text for the ranking loss


@dataclass
class METERCaptioningOptions(METERTaskOptions):
    max_gen_len: int = 20  # greedy decoding length
    # True: BLEU-4/CIDEr with whitespace tokenisation (no JVM, see fast_caption_metrics); False: the COCO metrics
    fast_metrics: bool = True


def _meter_of(source: Any) -> METERModel:
    """The METER model a head goes on: ``source`` itself, or the ``meter`` of a pretraining model."""
    meter = source.meter if isinstance(source, METERForPretraining) else source
    if not isinstance(meter, (METERModel, MeterConfig, str)):
        raise TypeError("a METER task builds on a METERModel, a METERForPretraining, a MeterConfig or a preset name; "
                        f"got {type(source).__name__}")
    return meter


class _METERTask(METERFamily):
    """What METER's tasks share: the METER model family (:class:`~multiway.meter.family.METERFamily`), training
    views (:class:`METERTaskOptions`), and the columns they give the study.

    ``study_columns`` maps a key of :meth:`evaluate`'s result to a column of the METER study's table;
    ``needs_decoder``: the task runs on encoder-decoder models only.
    """

    Options: ClassVar[type] = METERTaskOptions
    study_columns: ClassVar[dict[str, str]] = {}
    needs_decoder: ClassVar[bool] = False

    def fits(self, meter: METERModel) -> bool:
        """Whether the task runs on ``meter``'s architecture."""
        return meter.encoder_decoder or not self.needs_decoder

    def image_transform(self, split: str, data: DataSettings) -> Callable:
        if split == "train" and self.options.train_augment:
            return DownstreamTask.image_transform(self, split, data)  # type: ignore[arg-type]
        return self.eval_transform(data.img_size)  # type: ignore[attr-defined]

    def _eval(self, settings: EvalSettings | None) -> int:
        return (settings or EvalSettings()).batch_size


class METERVQA(_METERTask, VQAv2):
    """VQAv2 on a METER model: pooled [text CLS ; image CLS] -> MLP over the answers; BCE x answers; VQA score."""

    name, head = "vqav2", "meter_vqa"
    study_columns = {"vqa_score": "vqa_score"}

    def _logits(self, model: nn.Module, batch: dict[str, Any]) -> Tensor:
        """Answer logits (B, C): what ``multiway predict vqa`` ranks."""
        return model(batch["image"], batch["language_tokens"], batch["padding_mask"])

    def build_model(self, source: Any, num_classes: int | None = None) -> nn.Module:
        """source: the METER model (or pretraining model) the head goes on."""
        if num_classes is None:
            raise ValueError("METER VQA needs num_classes (the answer vocabulary's size)")
        return METERForVQA(_meter_of(source), num_labels=num_classes)

    def loss(self, model: nn.Module, batch: dict[str, Any], step: int = 0) -> tuple[Tensor, dict[str, float]]:
        return vqa_loss(model, batch)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, dataset: Dataset, settings: EvalSettings | None = None) -> dict[str, float]:
        return vqa_evaluate(model, dataset, self.collate, self._eval(settings))


class METERNLVR2(_METERTask, NLVR2):
    """NLVR2 on a METER model: the image pair's pooled features -> MLP -> true/false; accuracy (``nlvr2_acc``)."""

    name, head = "nlvr2", "meter_nlvr2"
    metric = "nlvr2_acc"
    study_columns = {"nlvr2_acc": "nlvr2_acc"}

    def _logits(self, model: nn.Module, batch: dict[str, Any]) -> Tensor:
        """True/false logits (B, 2) of a batch's image pairs and statements: what ``multiway predict nlvr2`` reads."""
        return model(batch["image"], batch["image2"], batch["language_tokens"], batch["padding_mask"])

    def build_model(self, source: Any, num_classes: int | None = None) -> nn.Module:
        return METERForNLVR2(_meter_of(source))

    def loss(self, model: nn.Module, batch: dict[str, Any], step: int = 0) -> tuple[Tensor, dict[str, float]]:
        return nlvr2_loss(model, batch)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, dataset: Dataset, settings: EvalSettings | None = None) -> dict[str, float]:
        return nlvr2_evaluate(model, dataset, self.collate, self._eval(settings))


class METERRetrieval(_METERTask, CocoRetrieval):
    """Image-text retrieval on a METER model: ITC candidates re-ranked by the fusion encoder's ranking head;
    recall both ways, headline ``average`` (re-ranked mean recall)."""

    name, head = "coco_retrieval", "meter_retrieval"
    metric, metric_label = "average", "mean recall (re-ranked)"
    Options = METERRetrievalOptions
    zero_shot_from_pretraining = False
    # no prediction on user files yet: BEiT-3's embed/search use its dual encoder's API
    predict_commands = ()
    predict = DownstreamTask.predict
    study_columns = {"ir_r@1": "ir_r@1", "tr_r@1": "tr_r@1", "average": "ret_avg", "dual_average": "ret_dual_avg"}

    def build_model(self, source: Any, num_classes: int | None = None) -> nn.Module:
        """source: a METER model, or a pretraining model whose ITM head (when trained with ITM) starts the ranking head."""
        itm = source.itm_head if isinstance(source, METERForPretraining) and source.config.objectives.itm else None
        return METERForRetrieval(_meter_of(source), itm_head=itm)

    def loss(self, model: nn.Module, batch: dict[str, Any], step: int = 0) -> tuple[Tensor, dict[str, float]]:
        return retrieval_loss(model, batch, self.options.num_negatives)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, dataset: Dataset, settings: EvalSettings | None = None) -> dict[str, float]:
        return retrieval_evaluate(model, dataset, self.collate, self._eval(settings), k=self.options.rerank_top_k)


class METERCaptioning(_METERTask, CocoRetrieval):
    """Captioning with METER's encoder-decoder, trained and scored on the retrieval index files (one caption per
    item): teacher-forced next-token loss; greedy captions per distinct image, CIDEr and BLEU-4 against all its
    captions."""

    name, head = "coco_captioning", "meter_captioning"
    metric, metric_label = "cider", "CIDEr"
    Options = METERCaptioningOptions
    zero_shot_from_pretraining = False
    needs_decoder = True
    study_columns = {"cider": "cider", "bleu4": "bleu4"}
    # `multiway predict caption` (BEiT-3's arguments; greedy decoding, so --num-beams is refused above 1)
    predict_commands = (PredictCommand("caption", "caption images", caption_arguments, _meter_caption_run),)

    def predict(self, predictor: Any, images: Any = None, text: Any = None, **options: Any) -> Any:
        """Captions of ``images``: rows ``{"path", "caption"}`` (options: max_len, batch_size)."""
        if images is None:
            raise TypeError(f"{self.name} predict needs images=")
        return meter_caption(predictor, images, **options)

    def build_model(self, source: Any, num_classes: int | None = None) -> nn.Module:
        return METERForCaptioning(_meter_of(source))

    def loss(self, model: nn.Module, batch: dict[str, Any], step: int = 0) -> tuple[Tensor, dict[str, float]]:
        return captioning_loss(model, batch)

    def _metrics_fn(self) -> Callable[[dict, dict], dict[str, float]] | None:
        return fast_caption_metrics if self.options.fast_metrics else None

    @torch.no_grad()
    def evaluate(self, model: nn.Module, dataset: Dataset, settings: EvalSettings | None = None) -> dict[str, float]:
        decode = _tokenizer_of(dataset).decode
        return captioning_evaluate(model, dataset, self.collate, self._eval(settings), decode, max_len=self.options.max_gen_len,
                                   metrics_fn=self._metrics_fn())

    def chance_level(self, train_set: Dataset, test_set: Dataset) -> float:
        """CIDEr of a random training caption (one seeded draw) for each test image."""
        import random

        decode = _tokenizer_of(train_set).decode
        captions = [decode(_item_ids(train_set, i)) for i in range(len(train_set))]
        refs: dict[int, list[str]] = {}
        for i in range(len(test_set)):
            refs.setdefault(_item_image_id(test_set, i), []).append(decode(_item_ids(test_set, i)))
        rng = random.Random(0)
        preds = {iid: rng.choice(captions) for iid in refs}
        return 100.0 * (self._metrics_fn() or caption_metrics)(preds, refs)["CIDEr"]


def _base_dataset(dataset: Dataset) -> Dataset:
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset


def _tokenizer_of(dataset: Dataset) -> Any:
    tok = getattr(_base_dataset(dataset), "tokenizer", None)
    if tok is None:
        raise ValueError("METER captioning needs a dataset built with a tokenizer (DataSettings.tokenizer) to decode captions")
    return tok


def _item(dataset: Dataset, i: int) -> dict[str, Any]:
    if isinstance(dataset, Subset):
        return _item(dataset.dataset, dataset.indices[i])
    return dataset.items[i]


def _item_ids(dataset: Dataset, i: int) -> list[int]:
    seg = _item(dataset, i)["text_segment"]
    return seg if isinstance(seg, list) else _tokenizer_of(dataset).text_to_ids(seg)


def _item_image_id(dataset: Dataset, i: int) -> int:
    return int(_item(dataset, i)["image_id"])
