"""Inference on a folder of user files: broken images reported by name, the rest processed; embed/search."""


import numpy as np
import pytest
import torch
from downstream_data import write_downstream_data

import multiway
from multiway.downstream import predict as P
from multiway.tokenizers.text import train_text_tokenizer


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("user")
    corpus = write_downstream_data(root, per_color=1)
    spm = train_text_tokenizer([corpus], root / "spm", vocab_size=40, hard_vocab_limit=False)
    images = root / "images" / "train"
    (images / "broken.png").write_bytes(b"not a png at all")
    return images, spm


def _pred(head, spm, **kwargs):
    torch.manual_seed(0)
    model = multiway.create_model(f"beit3_tiny_patch8_32_{head}", **kwargs)
    return P.load_predictor(model, tokenizer=spm, device="cpu")


def test_caption_folder_reports_broken_image(folder):
    images, spm = folder
    res = P.caption(_pred("captioning", spm), [images], num_beams=2, max_len=6)
    assert len(res.rows) == 4 and all(isinstance(r["caption"], str) for r in res.rows)
    assert len(res.errors) == 1 and "broken.png" in res.errors[0]


def test_vqa_classify_nlvr2(folder):
    images, spm = folder
    pred = _pred("vqav2", spm, num_classes=4)
    pred.labels = ["red", "green", "blue", "yellow"]
    res = P.answer(pred, [images], "what color is the square", topk=2)
    assert len(res.rows) == 4 and res.rows[0]["answer"] in pred.labels and len(res.rows[0]["top"]) == 2
    res = P.classify(_pred("imageclassification", spm, num_classes=3), [images])
    assert len(res.rows) == 4 and res.errors
    files = sorted(images.glob("*_0.png"))
    res = P.judge(_pred("nlvr2", spm), files[0], files[1], "both squares are red")
    assert 0 <= res.rows[0]["prob_true"] <= 1


def test_embed_and_search_both_directions(folder, tmp_path):
    images, spm = folder
    pred = _pred("retrieval", spm)
    built = P.build_index(pred, [images])
    index, errors = built.output, built.errors
    assert [r["path"] for r in built.rows] == index.paths
    assert index.embeddings.shape == (4, 64) and len(errors) == 1
    np.testing.assert_allclose(np.linalg.norm(index.embeddings, axis=1), 1, atol=1e-5)
    path = index.save(tmp_path / "idx")
    again = P.SearchIndex.load(path)
    assert again.paths == index.paths
    hits = P.search_text(pred, again, "a red square", k=3).rows
    assert len(hits) == 3 and hits[0]["score"] >= hits[1]["score"]
    res = P.search_image(pred, index.paths[0], ["a red square", "a blue square"], k=1)
    assert len(res.rows[0]["hits"]) == 1


def test_wrong_model_and_missing_tokenizer_errors(folder):
    images, spm = folder
    with pytest.raises(ValueError, match="captioning"):
        P.caption(_pred("vqav2", spm, num_classes=4), [images])
    model = multiway.create_model("beit3_tiny_patch8_32_captioning")
    with pytest.raises(ValueError, match="--tokenizer"):
        P.caption(P.load_predictor(model, device="cpu"), [images])
    with pytest.raises(FileNotFoundError, match="model not found"):
        P.load_predictor("/nonexistent/run")
