"""Metrics against hand-computed cases."""

import json
import math

import pytest
import torch

from multiway.downstream.metrics import (
    caption_metrics,
    java_available,
    normalize_vqa_answer,
    retrieval_recall,
    topk_accuracy,
    vqa_accuracy,
    vqa_score,
    vqa_targets,
    write_vqa_submission,
)


def test_topk_accuracy_hand_case():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.3], [0.2, 0.3, 0.5], [0.5, 0.4, 0.1]])
    targets = torch.tensor([1, 2, 0, 1])
    # top-1 hits: row0 only; top-2 hits: row0, row1 (0.3 second), row3 (0.4 second); row2's 0 is third.
    out = topk_accuracy(logits, targets, ks=(1, 2, 3))
    assert out == {"acc@1": 25.0, "acc@2": 75.0, "acc@3": 100.0}


def test_vqa_normalization():
    assert normalize_vqa_answer("Two Dogs!") == "2 dogs"
    assert normalize_vqa_answer("the dog") == "dog"
    assert normalize_vqa_answer("dont know") == "don't know"
    assert normalize_vqa_answer("1,000") == "1000"
    assert normalize_vqa_answer("yes.") == "yes"
    assert normalize_vqa_answer("None") == "0"


def test_vqa_soft_targets_official_counts():
    answer2label = {"yes": 0, "no": 1, "2": 2}
    answers = ["yes"] * 4 + ["no"] * 2 + ["2"] + ["maybe"] * 3  # 'maybe' is out of vocabulary
    labels, scores = vqa_targets(answers, answer2label)
    got = dict(zip(labels, scores))
    assert got == pytest.approx({0: 1.0, 1: 0.6, 2: 0.3})  # min(1, 0.3 * count): 1.2 -> 1.0
    # VQA score = soft target of the arg-max answer
    targets = torch.zeros(3, 3)
    targets[0, labels] = torch.tensor(scores)
    targets[1, 1] = 0.9
    logits = torch.tensor([[5.0, 1, 0], [0, 1, 5.0], [0, 1, 5.0]])
    assert vqa_score(logits, targets) == pytest.approx(100 * (1.0 + 0.0 + 0.0) / 3)
    logits[1] = torch.tensor([0, 5.0, 1])
    assert vqa_score(logits, targets) == pytest.approx(100 * (1.0 + 0.9 + 0.0) / 3)


def test_vqa_accuracy_leave_one_out():
    gts = [["red"] * 2 + ["blue"] * 8, ["two"] * 3 + ["3"] * 7, ["a cat"] * 9 + ["cat"], ["a cat"] * 10]
    # q0: 'red' matched by 2 humans: leave-one-out over 10: 2 cases see 1 match (1/3), 8 see 2 (2/3) -> 0.6
    # q1: prediction '2' == normalised 'two' (3 humans): 3 cases see 2 (2/3), 7 see 3 (1) -> 0.9
    # q2: the annotators disagree, so answers are processed: 'Cat' == 'a cat' -> 1
    # q3: the annotators agree, so nothing is processed (the official script): 'Cat' != 'a cat' -> 0
    acc = vqa_accuracy(["red", "2", "Cat", "Cat"], gts)
    assert acc == pytest.approx(100 * (0.6 + 0.9 + 1.0 + 0.0) / 4)


def test_vqa_submission_json(tmp_path):
    path = write_vqa_submission([11, 12], [1, 0], ["yes", "no"], tmp_path / "submit_vqav2_test.json")
    assert json.loads(path.read_text()) == [{"question_id": 11, "answer": "no"}, {"question_id": 12, "answer": "yes"}]


def test_retrieval_recall_with_duplicate_images():
    # 3 images, 2 captions each; image features are listed once per caption (duplicates by image_id).
    img = torch.eye(3)
    image_feats = img.repeat_interleave(2, dim=0)  # rows: 0,0,1,1,2,2
    image_ids = torch.tensor([0, 0, 1, 1, 2, 2])
    text_image_ids = torch.tensor([0, 0, 1, 1, 2, 2])
    # texts 0,1 -> image 0 (correct); text 2 -> image 2 (wrong), text 3 -> image 1; texts 4,5 -> image 0 (wrong)
    text_feats = torch.tensor(
        [[1.0, 0.1, 0.0], [0.9, 0.0, 0.2], [0.0, 0.3, 0.9], [0.1, 0.8, 0.0], [0.9, 0.0, 0.5], [0.8, 0.1, 0.6]]
    )
    out = retrieval_recall(image_feats, image_ids, text_feats, text_image_ids, ks=(1, 2))
    # IR@1: texts 0,1,3 rank their image first -> 3/6; IR@2: text 2 has image 1 second (0.3 > 0), texts 4,5 have
    # image 2 second -> 6/6.
    assert out["ir_r@1"] == pytest.approx(50.0)
    assert out["ir_r@2"] == pytest.approx(100.0)
    # TR@1 per de-duplicated image: image0 top text is 0 (ok); image1 top text 3 (ok); image2 top text 2 (0.9, wrong)
    # -> 2/3. TR@2: image2's top-2 are texts 2 (0.9) and 5 (0.6): 5 is its own -> 3/3.
    assert out["tr_r@1"] == pytest.approx(200 / 3)
    assert out["tr_r@2"] == pytest.approx(100.0)
    assert out["average"] == pytest.approx((50 + 100 + 200 / 3 + 100) / 4)


def test_retrieval_rejects_texts_without_images():
    with pytest.raises(ValueError, match="no image features"):
        retrieval_recall(torch.eye(2), torch.tensor([0, 1]), torch.eye(2), torch.tensor([0, 5]))


@pytest.mark.skipif(not java_available(), reason="pycocoevalcap's PTB tokenizer and METEOR need java")
def test_caption_metrics_known_pair():
    refs = {1: ["red cat sits here."], 2: ["green dog runs fast"]}
    preds = [{"image_id": 1, "caption": "Red cat sits here"}, {"image_id": 2, "caption": "green dog eats food"}]
    out = caption_metrics(preds, refs)
    # CIDEr-D by hand (2 images, idf = log 2 for every n-gram, clipped tf-idf cosine, no length penalty):
    # image 1 identical -> 10 * mean(1,1,1,1) = 10; image 2: unigrams 2 of 4 shared -> 2/4, bigrams 1 of 3 -> 1/3,
    # tri/4-grams 0 -> 10 * (1/2 + 1/3) / 4. Corpus CIDEr = mean of the two.
    assert out["CIDEr"] == pytest.approx((10 + 10 * (1 / 2 + 1 / 3) / 4) / 2, abs=1e-6)
    # BLEU-1 over the corpus: 6 of 8 candidate unigrams match, brevity penalty 1.
    assert out["Bleu_1"] == pytest.approx(6 / 8, abs=1e-6)
    assert out["Bleu_2"] == pytest.approx(math.sqrt(6 / 8 * 4 / 6), abs=1e-6)
    assert 0 < out["METEOR"] < 1 and 0 < out["ROUGE_L"] < 1


def test_caption_metrics_errors():
    with pytest.raises(ValueError, match="without references"):
        caption_metrics({3: "a cat"}, {1: ["a dog"]})
