"""Standard downstream metrics, callable from Python.

* :func:`topk_accuracy` — ImageNet top-1/top-5 (also NLVR2 and text classification accuracy via ``ks=(1,)``).
* VQA: :func:`normalize_vqa_answer` (the VQA evaluation's answer normalisation), :func:`vqa_targets` (the
  official BEiT-3 soft targets ``min(1, 0.3 * #annotators)``), :func:`vqa_score` (the official metric: the
  soft target of the arg-max answer), :func:`vqa_accuracy` (the VQA challenge metric on answer strings:
  ``min(1, #matching humans / 3)`` averaged over the 10 leave-one-out subsets) and
  :func:`write_vqa_submission` (the test-dev json ``[{question_id, answer}]``).
* :func:`retrieval_recall` — image→text (TR) and text→image (IR) R@1/5/10 with images de-duplicated by id.
* :func:`caption_metrics` — BLEU-1..4, METEOR, ROUGE-L, CIDEr (and optionally SPICE) through ``pycocoevalcap``.
  Tokenisation and METEOR need Java; without it the PTB tokenizer is replaced by a Python approximation and
  METEOR is left out (a warning says so).

All percentages are in [0, 100] except captioning scores, which follow pycocoevalcap ([0, 1], CIDEr in [0, 10]).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

# --- classification -------------------------------------------------------------------------------------


def topk_accuracy(logits: Tensor, targets: Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy in percent. logits: (N, C); targets: (N,) class ids (or (N, C) soft labels: their arg-max).

    Returns ``{"acc@1": ..., "acc@5": ...}``; a k above C counts every sample as correct.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be (N, C), got shape {tuple(logits.shape)}")
    if targets.dim() == 2:
        targets = targets.argmax(-1)
    if targets.shape[0] != logits.shape[0]:
        raise ValueError(f"{logits.shape[0]} logits rows but {targets.shape[0]} targets")
    n = max(1, logits.shape[0])
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top == targets[:, None]
    return {f"acc@{k}": 100.0 * hits[:, :k].any(1).float().sum().item() / n for k in ks}


def accuracy(logits: Tensor, targets: Tensor) -> float:
    """Top-1 accuracy in percent (NLVR2, text classification)."""
    return topk_accuracy(logits, targets, ks=(1,))["acc@1"]


# --- VQA ------------------------------------------------------------------------------------------------

_CONTRACTIONS = {
    # answers typed without the apostrophe -> the canonical form used by the VQA evaluation
    w.replace("'", ""): w
    for w in (
        "aren't can't couldn't couldn't've could've didn't doesn't don't hadn't hadn't've hasn't haven't he'd "
        "he'd've he's how'd how'll how's i'd i'd've i'm i've isn't it'd it'd've it'll it's let's ma'am mightn't "
        "mightn't've might've mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've she's "
        "should've shouldn't shouldn't've somebody'd somebody'd've somebody'll somebody's someone'd someone'd've "
        "someone'll someone's something'd something'd've something'll that's there'd there'd've there're there's "
        "they'd they'd've they'll they're they've 'twas wasn't we'd've we've weren't what'll what're what's what've "
        "when's where'd where's where've who'd who'd've who'll who's who've why'll why're why's won't would've "
        "wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've"
    ).split()
}
_NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_NUMBERS["none"] = "0"
_ARTICLES = {"a", "an", "the"}
_PUNCT = set(";/[]\"{}()=+\\_-><@`,?!")
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def normalize_vqa_answer(answer: str) -> str:
    """Normalise an answer string as the VQA evaluation does.

    Lower-case; newlines/tabs to spaces; punctuation removed (kept inside numbers such as ``1,000`` / ``2.5``,
    apostrophes kept); number words to digits; articles dropped; missing apostrophes of contractions restored.
    ``"Two Dogs!"`` -> ``"2 dogs"``; ``"dont know"`` -> ``"don't know"``.
    """
    text = answer.replace("\n", " ").replace("\t", " ").strip().lower()
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD_STRIP.sub("", out)
    words = []
    for word in out.split():
        word = _NUMBERS.get(word, word)
        if word in _ARTICLES:
            continue
        words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def vqa_soft_score(count: int) -> float:
    """Official BEiT-3 (and ViLT) soft target for an answer given by ``count`` annotators: ``min(1, 0.3·count)``."""
    return min(1.0, 0.3 * count)


def vqa_targets(answers: Iterable[str], answer2label: Mapping[str, int], normalize: bool = False) -> tuple[list[int], list[float]]:
    """Soft targets of one question from its annotators' answers (the official index's ``labels``/``scores``).

    Each distinct answer in the vocabulary gets :func:`vqa_soft_score` of its count. The official release counts
    the raw answer strings (``normalize=False``); ``normalize=True`` first applies :func:`normalize_vqa_answer`.
    """
    counts = Counter(normalize_vqa_answer(a) if normalize else a for a in answers)
    labels, scores = [], []
    for answer, count in counts.items():
        if answer in answer2label:
            labels.append(answer2label[answer])
            scores.append(vqa_soft_score(count))
    return labels, scores


def vqa_score(logits: Tensor, targets: Tensor) -> float:
    """Official VQA metric (percent): mean soft target of the arg-max answer. logits, targets: (N, num_answers)."""
    if logits.shape != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and soft targets {tuple(targets.shape)} differ in shape")
    picked = targets.gather(1, logits.argmax(-1, keepdim=True)).squeeze(1)
    return 100.0 * picked.float().sum().item() / max(1, logits.shape[0])


# The official VQA evaluation (GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/vqaEval.py), restated.
# It differs from normalize_vqa_answer (the ViLT/BEiT-3 normaliser that builds the answer vocabulary) in what it
# processes and when: nothing is lower-cased or normalised when the ten annotators agree, and its contraction
# table is its own (it restores "dont" but not "its", and maps "somebody'd" to "somebodyd").
_EVAL_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
# Canonical forms; the evaluation restores each from every spelling that lacks exactly one of its apostrophes
# ("couldnt've" and "couldn'tve" -> "couldn't've"). The capitalised forms never match: words are lower-cased first.
_EVAL_CONTRACTED = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd he'd've "
    "he's how'd how'll how's I'd've I'm I've isn't it'd it'd've it'll ma'am mightn't mightn't've might've mustn't "
    "must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't shouldn't've somebody'd've "
    "somebody'll somebody's someone'd someone'd've someone'll someone's something'd something'd've something'll that's "
    "there'd there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't we'd've we've weren't "
    "what'll what're what's what've when's where'd where's where've who'd who'd've who'll who's who've why'll why're "
    "why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've"
).split()
_EVAL_CONTRACTIONS = {
    **{form[:i] + form[i + 1 :]: form for form in _EVAL_CONTRACTED for i, ch in enumerate(form) if ch == "'"},
    # the table's three entries that follow no rule
    "let's": "let's",
    "she's": "she's",
    "somebody'd": "somebodyd",
}
# The script hands re.UNICODE (= 32) to Pattern.sub where ``count`` goes: at most 32 periods are stripped.
_EVAL_PERIOD_STRIP_COUNT = int(re.UNICODE)


def _vqa_eval_punctuation(text: str) -> str:
    """Punctuation step of the official evaluation (case kept). A mark is deleted when it touches a space or when
    the text holds a digit-comma-digit (``"1,000"``), else replaced by a space; periods not before a digit go."""
    has_number_comma = _COMMA_STRIP.search(text) is not None
    out = text
    for mark in _EVAL_PUNCT:
        joined = has_number_comma or (mark + " " in text) or (" " + mark in text)
        out = out.replace(mark, "" if joined else " ")
    return _PERIOD_STRIP.sub("", out, count=_EVAL_PERIOD_STRIP_COUNT)


def _vqa_eval_digits_articles(text: str) -> str:
    """Digit/article/contraction step: lower-case, split on whitespace, number words to digits (``none`` -> 0),
    articles dropped, then the contraction table; words rejoined with single spaces."""
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(_EVAL_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_question_accuracy(prediction: str, gt_answers: Sequence[str]) -> float:
    """Accuracy in [0, 1] of one answer, exactly as the official VQA evaluation scores a question.

    1. Newlines and tabs become spaces and both ends are stripped, on every answer.
    2. Only if the annotators' answers are not all identical are they and the prediction processed
       (:func:`_vqa_eval_punctuation`, then :func:`_vqa_eval_digits_articles`); otherwise they are compared as
       typed, case included.
    3. For each annotator ``i``: ``min(1, #{j != i : gt_j == prediction} / 3)``; the result is the mean over the
       leave-one-out subsets (10 for VQAv2). Each annotator is left out once, duplicates included (the official
       answers are distinct records).
    """
    if not gt_answers:
        raise ValueError("gt_answers is empty: a question needs at least one annotator answer")
    clean = lambda a: a.replace("\n", " ").replace("\t", " ").strip()  # noqa: E731
    pred, gts = clean(prediction), [clean(g) for g in gt_answers]
    if len(set(gts)) > 1:
        gts = [_vqa_eval_digits_articles(_vqa_eval_punctuation(g)) for g in gts]
        pred = _vqa_eval_digits_articles(_vqa_eval_punctuation(pred))
    matches = sum(g == pred for g in gts)
    return sum(min(1.0, (matches - (g == pred)) / 3) for g in gts) / len(gts)


def vqa_accuracy(predictions: Sequence[str], gt_answers: Sequence[Sequence[str]]) -> float:
    """VQA challenge accuracy (percent) on answer strings: the mean of :func:`vqa_question_accuracy`.

    predictions: one answer per question; gt_answers: the annotators' answers of each question (10 in VQAv2).
    The official script reports ``round(100 * mean, 2)``; this returns the unrounded value.
    """
    if len(predictions) != len(gt_answers):
        raise ValueError(f"predictions has {len(predictions)} answers but gt_answers has {len(gt_answers)} answer lists")
    if not predictions:
        raise ValueError("predictions is empty: nothing to score")
    total = 0.0
    for index, (pred, gts) in enumerate(zip(predictions, gt_answers)):
        if not isinstance(pred, str) or isinstance(gts, str):
            raise TypeError(
                f"question {index}: expected predictions[{index}] to be a string and gt_answers[{index}] a list of strings, "
                f"got {type(pred).__name__} and {type(gts).__name__}"
            )
        if not gts:
            raise ValueError(f"gt_answers[{index}] is empty: a question needs at least one annotator answer")
        total += vqa_question_accuracy(pred, gts)
    return 100.0 * total / len(predictions)


def write_vqa_submission(
    question_ids: Sequence[int], predicted_labels: Sequence[int], label2ans: Sequence[str] | Mapping[int, str], path: str | os.PathLike
) -> Path:
    """Write the VQAv2 test-dev/test-std submission file ``[{"question_id": int, "answer": str}, ...]``."""
    if len(question_ids) != len(predicted_labels):
        raise ValueError(f"{len(question_ids)} question ids but {len(predicted_labels)} predictions")
    rows = [{"question_id": int(q), "answer": label2ans[int(p)]} for q, p in zip(question_ids, predicted_labels)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows))
    return path


# --- retrieval ------------------------------------------------------------------------------------------


def dedup_images(image_feats: Tensor, image_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Keep the first row of each ``image_id`` (datasets list an image once per caption). Returns (feats, ids) sorted by id."""
    ids = image_ids.tolist()
    first: dict[int, int] = {}
    for row, i in enumerate(ids):
        first.setdefault(int(i), row)
    order = sorted(first)
    rows = torch.tensor([first[i] for i in order], dtype=torch.long, device=image_feats.device)
    return image_feats.index_select(0, rows), torch.tensor(order, dtype=torch.long, device=image_feats.device)


def retrieval_recall(
    image_feats: Tensor, image_ids: Tensor, text_feats: Tensor, text_image_ids: Tensor, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Image-text retrieval recall (percent), both directions, as the official evaluation computes it.

    image_feats: (N_i, D) one row per image *or per caption* (rows with a repeated ``image_ids`` value are
    dropped); text_feats: (N_t, D); text_image_ids: (N_t,) the image each text describes. Scores are dot
    products (features are expected L2-normalised). ``tr_r@k``: an image finds one of its texts in its top k;
    ``ir_r@k``: a text finds its image in its top k. Also returns ``tr_mean``, ``ir_mean`` and ``average``
    (the mean of all six numbers for ks=(1,5,10), the official ``average_score``).
    """
    if image_feats.shape[0] != image_ids.shape[0]:
        raise ValueError(f"{image_feats.shape[0]} image features but {image_ids.shape[0]} image ids")
    if text_feats.shape[0] != text_image_ids.shape[0]:
        raise ValueError(f"{text_feats.shape[0]} text features but {text_image_ids.shape[0]} text image ids")
    image_feats, image_ids = dedup_images(image_feats, image_ids)
    text_image_ids = text_image_ids.to(image_ids.device)
    missing = set(text_image_ids.tolist()) - set(image_ids.tolist())
    if missing:
        raise ValueError(f"texts refer to image ids with no image features: {sorted(missing)[:10]}")
    scores = image_feats.float() @ text_feats.float().t()  # (I, T)
    out: dict[str, float] = {}
    for k in ks:
        kt, ki = min(k, scores.shape[1]), min(k, scores.shape[0])
        top_texts = scores.topk(kt, dim=1).indices  # (I, k)
        out[f"tr_r@{k}"] = 100.0 * (text_image_ids[top_texts] == image_ids[:, None]).any(1).float().mean().item()
        top_images = scores.topk(ki, dim=0).indices  # (k, T)
        out[f"ir_r@{k}"] = 100.0 * (image_ids[top_images] == text_image_ids[None, :]).any(0).float().mean().item()
    out["tr_mean"] = sum(out[f"tr_r@{k}"] for k in ks) / len(ks)
    out["ir_mean"] = sum(out[f"ir_r@{k}"] for k in ks) / len(ks)
    out["average"] = (out["tr_mean"] + out["ir_mean"]) / 2
    return out


# --- captioning -----------------------------------------------------------------------------------------


def java_available() -> bool:
    return shutil.which("java") is not None


_PTB_PUNCT = {"''", "'", "``", "`", "-lrb-", "-rrb-", "-lcb-", "-rcb-", ".", "?", "!", ",", ":", "-", "--", "...", ";"}


def _python_tokenize(captions: Mapping[object, list[str]]) -> dict[object, list[str]]:
    """Fallback for the PTB tokenizer (no Java): lower-case, split off punctuation, drop it."""
    out = {}
    for key, caps in captions.items():
        toks = []
        for c in caps:
            words = re.findall(r"[\w']+|[^\w\s]", c.lower())
            toks.append(" ".join(w for w in words if w not in _PTB_PUNCT))
        out[key] = toks
    return out


def caption_metrics(
    predictions: Mapping[object, str] | Sequence[Mapping[str, object]],
    references: Mapping[object, Sequence[str]],
    spice: bool = False,
    only: Sequence[str] | None = None,
) -> dict[str, float]:
    """COCO caption metrics through pycocoevalcap.

    Args:
        predictions: ``{image_id: caption}`` or the official result list ``[{"image_id", "caption"}, ...]``.
        references: ``{image_id: [reference captions]}``; every predicted image must have references
            (references of images without a prediction are ignored, as COCOEvalCap does).
        spice: also run SPICE (needs Java and downloads Stanford CoreNLP models on first use).
        only: compute just these metrics (e.g. ``["CIDEr"]``: skips METEOR's slow Java start); default all.

    Returns ``{"Bleu_1".."Bleu_4", "METEOR", "ROUGE_L", "CIDEr"[, "SPICE"]}``.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if not isinstance(predictions, Mapping):
        predictions = {p["image_id"]: p["caption"] for p in predictions}
    if not predictions:
        raise ValueError("no predictions to score")
    missing = [k for k in predictions if k not in references]
    if missing:
        raise ValueError(f"predictions for image ids without references: {missing[:10]}")
    res = {k: [str(v)] for k, v in predictions.items()}
    gts = {k: [str(r) for r in references[k]] for k in predictions}
    have_java = java_available()
    if have_java:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        tok = PTBTokenizer()
        gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in gts.items()})
        res = tok.tokenize({k: [{"caption": c} for c in v] for k, v in res.items()})
    else:
        logger.warning("java not found: METEOR/SPICE skipped and the PTB tokenizer approximated in Python")
        gts, res = _python_tokenize(gts), _python_tokenize(res)
    scorers: list[tuple[object, list[str] | str]] = [(Bleu(4), ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"])]
    if have_java and (only is None or "METEOR" in only):
        from pycocoevalcap.meteor.meteor import Meteor

        scorers.append((Meteor(), "METEOR"))
    scorers += [(Rouge(), "ROUGE_L"), (Cider(), "CIDEr")]
    if spice and have_java:
        from pycocoevalcap.spice.spice import Spice

        scorers.append((Spice(), "SPICE"))
    if only is not None:
        unknown = set(only) - {n for _, names in scorers for n in ([names] if isinstance(names, str) else names)} - {"METEOR", "SPICE"}
        if unknown:
            raise ValueError(f"unknown caption metric(s) {sorted(unknown)}")
        scorers = [(sc, names) for sc, names in scorers if set([names] if isinstance(names, str) else names) & set(only)]
    out: dict[str, float] = {}
    for scorer, names in scorers:
        if isinstance(scorer, Bleu):
            score, _ = scorer.compute_score(gts, res, verbose=0)
        else:
            score, _ = scorer.compute_score(gts, res)
        if isinstance(names, list):
            out.update({n: float(s) for n, s in zip(names, score)})
        else:
            out[names] = float(score)
        if hasattr(scorer, "close"):
            scorer.close()
        elif hasattr(scorer, "meteor_p"):
            _close_meteor(scorer)
    return out


def _close_meteor(meteor) -> None:
    """pycocoevalcap's Meteor keeps a Java process open until garbage collection; end it now."""
    with meteor.lock:
        meteor.meteor_p.stdin.close()
        meteor.meteor_p.kill()
        meteor.meteor_p.wait()


__all__ = [
    "accuracy",
    "caption_metrics",
    "dedup_images",
    "java_available",
    "normalize_vqa_answer",
    "retrieval_recall",
    "topk_accuracy",
    "vqa_accuracy",
    "vqa_question_accuracy",
    "vqa_score",
    "vqa_soft_score",
    "vqa_targets",
    "write_vqa_submission",
]
