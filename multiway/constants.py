"""Constants shared across the package: special token ids, image normalisation, official index file names."""

from __future__ import annotations

# Special token ids of the BEiT-3 SentencePiece vocabulary (XLM-R layout: <s>, <pad>, </s>, <unk> first). The
# mask id is not fixed: it is the tokenizer's last piece (``TextTokenizer.mask_id``).
BOS_ID, PAD_ID, EOS_ID, UNK_ID = 0, 1, 2, 3

# Image normalisation: ImageNet statistics (image classification, the VQ-KD teachers) and the 0.5/0.5 of
# BEiT-3's vision-language tasks (timm's IMAGENET_INCEPTION_MEAN/STD).
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
VL_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
VL_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)

# The official BEiT-3 index file names per task and split (unilm/beit3 datasets.py), relative to ``data_dir``.
INDEX_FILES: dict[str, dict[str, tuple[str, ...]]] = {
    "imagenet": {"train": ("imagenet.train.index.jsonl",), "val": ("imagenet.val.index.jsonl",),
                 "test": ("imagenet.val.index.jsonl",)},
    "nlvr2": {"train": ("nlvr2.train.index.jsonl",), "val": ("nlvr2.dev.index.jsonl",),
              "test": ("nlvr2.test-P.index.jsonl",)},
    "vqav2": {"train": ("vqa.train.jsonl", "vqa.trainable_val.jsonl"), "val": ("vqa.rest_val.jsonl",),
              "test": ("vqa.test.jsonl",), "test-dev": ("vqa.test-dev.jsonl",)},
    "coco_retrieval": {s: (f"coco_retrieval.{s}.jsonl",) for s in ("train", "val", "test")},
    "flickr30k": {s: (f"flickr30k.{s}.jsonl",) for s in ("train", "val", "test")},
    "coco_captioning": {"train": ("coco_captioning.train.jsonl",), "val": ("coco_captioning.val.jsonl",),
                        "test": ("coco_captioning.test.jsonl",)},
    "nocaps": {"train": ("coco_captioning.train.jsonl",), "val": ("nocaps.val.jsonl",),
               "test": ("nocaps.test.jsonl",)},
}
VQA_ANSWER_FILE = "answer2label.txt"  # the VQAv2 answer vocabulary beside the vqa.*.jsonl indexes
