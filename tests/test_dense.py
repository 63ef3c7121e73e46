"""Dense vision and sequence labelling: pyramids, heads (losses fall), data formats and their errors, metrics."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from multiway.data.io import DataError
from multiway.dense.builtin import write_dense_data
from multiway.dense.data import ADE20KDataset, CocoInstances, ConllDataset, align_labels, collate_detection, read_conll, word_predictions
from multiway.dense.detection import build_detector, large_scale_jitter, soft_nms
from multiway.dense.metrics import ConfusionMatrix, coco_ap, entity_f1
from multiway.dense.pyramid import DenseBackbone, default_taps
from multiway.dense.segmentation import UperNetSegmenter, reduce_zero_label, slide_inference
from multiway.dense.sequence_labelling import TokenClassifier
from multiway.model.config import get_config
from multiway.model.multiway import MultiwayTransformer


def _backbone(**overrides) -> MultiwayTransformer:
    torch.manual_seed(0)
    return MultiwayTransformer(get_config("beit3_tiny_patch8_32", **overrides))


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    from multiway.data.shapes import generate_synthetic_dataset

    out = generate_synthetic_dataset(tmp_path_factory.mktemp("shapes"), num_images=40, num_pairs=10, imagenet_per_class=2,
                                     img_size=64, progress=False)
    return write_dense_data(out)


# --- pyramids ----------------------------------------------------------------------------------------------------


def test_vitdet_pyramid_levels_and_strides():
    backbone = DenseBackbone(_backbone(), "vitdet", out_channels=16)
    maps = backbone(torch.randn(2, 3, 64, 32))
    assert {k: tuple(v.shape) for k, v in maps.items()} == {
        "p2": (2, 16, 32, 16), "p3": (2, 16, 16, 8), "p4": (2, 16, 8, 4), "p5": (2, 16, 4, 2), "p6": (2, 16, 2, 1)}


def test_beit_pyramid_taps_four_blocks():
    assert default_taps(12) == (3, 5, 7, 11) and default_taps(24) == (7, 11, 15, 23) and default_taps(4) == (0, 1, 2, 3)
    beit3 = _backbone(depth=4)
    raw = DenseBackbone(beit3, "beit", out_channels=0)
    maps = raw(torch.randn(2, 3, 32, 32))
    assert [tuple(v.shape) for v in maps.values()] == [(2, 64, 16, 16), (2, 64, 8, 8), (2, 64, 4, 4), (2, 64, 2, 2)]
    # the identity level is block 2's map (the third tap) as forward_intermediates gives it
    block2 = beit3.forward_intermediates(torch.zeros(1, 3, 32, 32), indices=[2], intermediates_only=True)[0]
    raw.eval()
    torch.testing.assert_close(raw(torch.zeros(1, 3, 32, 32))["p4"], block2)
    with_fpn = DenseBackbone(beit3, "beit", out_channels=16)
    assert list(with_fpn(torch.randn(1, 3, 32, 32))) == ["p2", "p3", "p4", "p5", "p6"]


# --- detection ---------------------------------------------------------------------------------------------------


TINY_HEADS = dict(box_head_width=64, mask_head_width=16, box_batch_size_per_image=64, rpn_pre_nms_top_n_train=300,
                  rpn_post_nms_top_n_train=100, rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=100)


def _shapes_batch(shapes_dir, n=2):
    data = CocoInstances(shapes_dir / "coco" / "instances_train.json", shapes_dir)
    return data, collate_detection([data[i] for i in range(n)])


@pytest.mark.parametrize("pyramid", ["vitdet", "beit"])
def test_mask_rcnn_trains_and_predicts(shapes_dir, pyramid):
    data, batch = _shapes_batch(shapes_dir)
    torch.manual_seed(0)
    model = build_detector(_backbone(window_size=4, global_attention_interval=2), data.num_classes, masks=True, pyramid=pyramid,
                           out_channels=32, min_size=64, max_size=64, **TINY_HEADS)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    totals = []
    for _ in range(4):
        losses = model(batch["images"], batch["targets"])
        assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        totals.append(total.item())
    assert totals[-1] < totals[0]
    model.eval()
    with torch.no_grad():
        out = model(batch["images"])
    assert len(out) == 2 and out[0]["masks"].shape[1:] == (1, 64, 64) and out[0]["boxes"].shape[1] == 4


def test_soft_nms_decays_overlaps_instead_of_removing_them():
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 0, 11, 10], [50, 50, 60, 60], [0, 0, 10, 10]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    labels = torch.tensor([1, 1, 1, 2])
    keep, new = soft_nms(boxes, scores, labels, sigma=0.5)
    iou = 90 / 110
    expected = {0: 0.9, 1: 0.8 * math.exp(-(iou**2) / 0.5), 2: 0.7, 3: 0.6}  # box 3 is another class: untouched
    assert dict(zip(keep.tolist(), new.tolist())) == pytest.approx(expected)
    assert new.tolist() == sorted(new.tolist(), reverse=True)
    keep, new = soft_nms(boxes, scores, labels, method="linear", iou_threshold=0.5)
    assert dict(zip(keep.tolist(), new.tolist()))[1] == pytest.approx(0.8 * (1 - iou))


def test_soft_nms_option_in_the_detector(shapes_dir):
    data, batch = _shapes_batch(shapes_dir, 1)
    model = build_detector(_backbone(), data.num_classes, masks=False, out_channels=16, min_size=64, max_size=64, soft_nms=True,
                           detections_per_img=5, **TINY_HEADS).eval()
    with torch.no_grad():
        out = model(batch["images"])[0]
    assert set(out) == {"boxes", "labels", "scores"} and len(out["boxes"]) <= 5


def test_large_scale_jitter_keeps_boxes_and_masks_aligned(shapes_dir):
    data = CocoInstances(shapes_dir / "coco" / "instances_train.json", shapes_dir, transform=large_scale_jitter(64, (0.5, 1.5)))
    torch.manual_seed(1)
    for i in range(4):
        item = data[i]
        assert item["image"].shape == (3, 64, 64)
        target = item["target"]
        assert target["masks"].shape[1:] == (64, 64) and len(target["masks"]) == len(target["boxes"]) == len(target["labels"])
        for box, mask in zip(target["boxes"], target["masks"]):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            if len(xs):  # the mask lies within its (jittered) box
                assert xs.min() >= box[0] - 1 and xs.max() <= box[2] + 1 and ys.min() >= box[1] - 1 and ys.max() <= box[3] + 1


# --- semantic segmentation ----------------------------------------------------------------------------------------


def test_upernet_loss_falls(shapes_dir):
    data = ADE20KDataset(shapes_dir / "ade20k", "train")
    images = torch.stack([data[i]["image"][:, :32, :32] for i in range(2)])  # 32 px crops keep it fast
    labels = torch.stack([data[i]["label"][:32, :32] for i in range(2)])
    torch.manual_seed(0)
    model = UperNetSegmenter(_backbone(), num_classes=7, channels=32, aux_channels=16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(4):
        logits, loss = model(images, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert logits.shape == (2, 7, 32, 32) and losses[-1] < losses[0]


class _PixelModel(nn.Module):
    """A 1x1 conv: translation-equivariant, so sliding windows must reproduce the whole-image scores."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return self.conv(x), None


def test_slide_inference_covers_the_image_once_averaged():
    model = _PixelModel()
    image = torch.randn(1, 3, 40, 70)
    expected = model(image)[0].softmax(1)
    torch.testing.assert_close(slide_inference(model, image, 4, crop=32, stride=20), expected)
    small = torch.randn(1, 3, 20, 24)  # smaller than the crop: padded, then cropped back
    torch.testing.assert_close(slide_inference(model, small, 4, crop=32, stride=20), model(small)[0].softmax(1))


def test_reduce_zero_label():
    assert reduce_zero_label(np.array([[0, 1, 2], [150, 255, 3]])).tolist() == [[255, 0, 1], [149, 255, 2]]


# --- sequence labelling -------------------------------------------------------------------------------------------


class _PiecesTokenizer:
    """Words split into pieces of 2 characters; piece ids from a growing table."""

    unk_id = 3

    def __init__(self):
        self.table: dict[str, int] = {}

    def text_to_ids(self, word):
        return [self.table.setdefault(word[i : i + 2], 10 + len(self.table)) for i in range(0, len(word), 2)]


def test_align_labels_marks_first_subwords_only():
    tok = _PiecesTokenizer()
    ids, pad, labels, word_of = align_labels(["red", "circle", "x"], ["B-COLOUR", "B-SHAPE", "O"], tok,
                                             {"O": 0, "B-COLOUR": 1, "B-SHAPE": 2}, max_len=10)
    # <s> re d ci rc le x </s> <pad> <pad>
    assert labels == [-100, 1, -100, 2, -100, -100, 0, -100, -100, -100]
    assert word_of == [-1, 0, -1, 1, -1, -1, 2, -1, -1, -1] and pad == [0] * 8 + [1] * 2 and ids[0] == 0 and ids[7] == 2
    logits = torch.full((1, 10, 3), -1.0)
    logits[0, 1, 1] = logits[0, 3, 2] = 1.0
    assert word_predictions(logits, torch.tensor([word_of]), [3], ["O", "B-COLOUR", "B-SHAPE"]) == [["B-COLOUR", "B-SHAPE", "O"]]
    # cut words (beyond max_len) are predicted "O"
    _, _, _, cut = align_labels(["red", "circle", "x"], ["O", "O", "O"], tok, {"O": 0}, max_len=5)
    assert cut == [-1, 0, -1, -1, -1]


def test_token_classifier_loss_falls(shapes_dir):
    from multiway.tokenizers.text import TextTokenizer

    data = ConllDataset(shapes_dir / "conll" / "train.txt", TextTokenizer(shapes_dir / "shapes.spm"), max_len=24)
    batch = {k: torch.stack([data[i][k] for i in range(8)]) for k in ("language_tokens", "padding_mask", "labels")}
    torch.manual_seed(0)
    model = TokenClassifier(_backbone(vocab_size=200), len(data.tag_names))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(8):
        _, loss = model(batch["language_tokens"], batch["padding_mask"], batch["labels"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


# --- data formats and their errors --------------------------------------------------------------------------------


def test_builtin_coco_masks_match_the_drawn_shapes(shapes_dir):
    data = CocoInstances(shapes_dir / "coco" / "instances_train.json", shapes_dir)
    coco = json.loads((shapes_dir / "coco" / "instances_train.json").read_text())
    kinds = {type(a["segmentation"]).__name__ for a in coco["annotations"]}
    assert kinds == {"list", "dict"}  # polygons and RLE both present
    item = data[0]
    image = item["image"]
    for box, mask in zip(item["target"]["boxes"], item["target"]["masks"]):
        inside, outside = image[:, mask.bool()].mean(1), image[:, ~mask.bool()].mean(1)
        assert not torch.allclose(inside, outside, atol=0.05)  # the mask covers a differently coloured region
        ys, xs = torch.nonzero(mask, as_tuple=True)
        assert xs.min() >= box[0] - 1 and xs.max() <= box[2] and ys.min() >= box[1] - 1 and ys.max() <= box[3]
    ade = ADE20KDataset(shapes_dir / "ade20k", "train")
    assert set(ade[0]["label"].unique().tolist()) <= {0, 1, 2, 3, 4, 5, 6, 255}


def _broken_coco(tmp_path, shapes_dir, change):
    coco = json.loads((shapes_dir / "coco" / "instances_train.json").read_text())
    change(coco)
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(coco))
    return path


@pytest.mark.parametrize("change, message", [
    (lambda c: c["annotations"][0].update(bbox=[50, 50, 40, 40]), "lies outside the 64x64 image"),
    (lambda c: c["annotations"][0].update(category_id=99), "category_id 99 is not in categories"),
    (lambda c: c["annotations"][next(i for i, a in enumerate(c["annotations"]) if isinstance(a["segmentation"], dict))]
     ["segmentation"].update(size=[32, 32]), "RLE mask size \\[32, 32\\] differs"),
])
def test_bad_coco_annotations_are_named_or_skipped(tmp_path, shapes_dir, change, message):
    path = _broken_coco(tmp_path, shapes_dir, change)
    with pytest.raises(DataError, match=f"{path.name}: annotation id \\d+ .*{message}"):
        CocoInstances(path, shapes_dir)
    good = CocoInstances(shapes_dir / "coco" / "instances_train.json", shapes_dir)
    skipped = CocoInstances(path, shapes_dir, on_error="skip")
    assert skipped.errors.count == 1
    assert sum(map(len, skipped.annotations.values())) == sum(map(len, good.annotations.values())) - 1


def test_unreadable_label_png_and_size_mismatch(tmp_path, shapes_dir):
    import shutil

    from PIL import Image

    root = tmp_path / "ade"
    shutil.copytree(shapes_dir / "ade20k", root)
    labels = sorted((root / "annotations" / "training").iterdir())
    labels[0].write_bytes(b"not a png")
    Image.new("L", (32, 32)).save(labels[1])
    data = ADE20KDataset(root, "train")
    with pytest.raises(DataError, match=f"{labels[0].name}: cannot read the label PNG"):
        data[0]
    with pytest.raises(DataError, match=f"{labels[1].name}: label is 32x32 but its image .* is 64x64"):
        data[1]
    skipping = ADE20KDataset(root, "train", on_error="skip")
    assert "_skipped" in skipping[0] and "_skipped" in skipping[1] and "label" in skipping[2]


def test_conll_tag_not_in_tag_set(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_text("-DOCSTART- -X- -X- O\n\nred _ _ B-COLOUR\ncircle _ _ B-SHAPE\n\nblue _ _ B-COLUR\n\nsquare _ _ B-SHAPE\n")
    tags = ("O", "B-COLOUR", "B-SHAPE")
    with pytest.raises(DataError, match=r"bad.txt:6: tag 'B-COLUR' is not in the tag set"):
        read_conll(path, tags)
    from multiway.data.io import DataErrors

    errors = DataErrors("skip")
    assert read_conll(path, tags, errors=errors) == [(["red", "circle"], ["B-COLOUR", "B-SHAPE"]), (["square"], ["B-SHAPE"])]
    assert errors.count == 1


# --- metrics ------------------------------------------------------------------------------------------------------


def _coco_gt(tmp_path):
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    square = np.zeros((100, 100), np.uint8, order="F")
    square[10:50, 10:50] = 1
    rle = mask_utils.encode(np.asfortranarray(square))
    gt = {"images": [{"id": 1, "width": 100, "height": 100, "file_name": "a.png"}], "categories": [{"id": 7, "name": "thing"}],
          "annotations": [
              {"id": 1, "image_id": 1, "category_id": 7, "bbox": [10, 10, 40, 40], "area": 1600, "iscrowd": 0,
               "segmentation": {"size": [100, 100], "counts": rle["counts"].decode()}},
              {"id": 2, "image_id": 1, "category_id": 7, "bbox": [60, 60, 30, 30], "area": 900, "iscrowd": 0,
               "segmentation": [[60, 60, 90, 60, 90, 90, 60, 90]]}]}
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path)), rle


def test_coco_box_and_mask_ap_on_a_known_case(tmp_path):
    coco, rle = _coco_gt(tmp_path)
    segm = {"size": [100, 100], "counts": rle["counts"].decode()}
    both = [{"image_id": 1, "category_id": 7, "score": 0.9, "bbox": [10, 10, 40, 40], "segmentation": segm}]
    # one of the two objects found exactly, nothing else: precision 1 up to recall 0.5, so AP = 51/101 (101-point)
    box = coco_ap(coco, both, "bbox")
    assert box["AP"] == pytest.approx(100 * 51 / 101, abs=1e-3) and box["AP50"] == box["AP75"] == box["AP"]
    # by area: the found 40x40 object is "medium" (1600 px), the missed 30x30 one "small" (900 < 32^2); no "large" (-1 -> 0)
    assert box["APm"] == pytest.approx(100.0) and box["APs"] == 0.0 and box["APl"] == 0.0
    assert coco_ap(coco, both, "segm")["AP"] == pytest.approx(100 * 51 / 101, abs=1e-3)
    perfect = both + [{"image_id": 1, "category_id": 7, "score": 0.8, "bbox": [60, 60, 30, 30]}]
    assert coco_ap(coco, perfect, "bbox")["AP"] == pytest.approx(100.0)
    assert coco_ap(coco, [], "bbox")["AP"] == 0.0


def test_confusion_matrix_on_a_known_case():
    cm = ConfusionMatrix(3, ignore_index=255)
    target = np.array([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 0, 2]])
    cm.update(pred, target)
    # class 0: TP 1, FN 1, FP 1 -> IoU 1/3; class 1: TP 2, FP 1 -> 2/3; class 2: TP 1, FN 1 -> 1/2
    result = cm.compute()
    assert result["IoU"] == pytest.approx([100 / 3, 200 / 3, 50.0])
    assert result["mIoU"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3 * 100)
    assert result["mAcc"] == pytest.approx((0.5 + 1 + 0.5) / 3 * 100)
    assert result["aAcc"] == pytest.approx(4 / 6 * 100)
    with pytest.raises(ValueError, match="differ in shape"):
        cm.update(pred[:1], target)


def test_entity_f1_on_a_known_case():
    true = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    pred = [["B-PER", "I-PER", "O", "O"], ["B-ORG", "B-LOC"]]
    # entities: true {PER, LOC, ORG}, predicted {PER, ORG, LOC (wrong span)}: 2 of 3 right both ways
    result = entity_f1(true, pred)
    assert result["precision"] == pytest.approx(200 / 3) and result["recall"] == pytest.approx(200 / 3)
    assert result["f1"] == pytest.approx(200 / 3)
    assert entity_f1([["B-X", "I-X"]], [["B-X", "O"]])["f1"] == 0.0  # a partial span is no entity
