"""Export: onnxruntime matches PyTorch eager (fp32, <= 1e-4) at other batch sizes and text lengths than traced,
with the normalisation and the padding mask inside the graph; a part that cannot be exported says why."""

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from serving_data import make_serving_data  # noqa: E402

from multiway.downstream import predict as P  # noqa: E402
from multiway.export import ExportError, export_model, onnx_outputs, read_spec  # noqa: E402


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_serving_data(tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module")
def retrieval_onnx(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "retrieval.onnx"
    return export_model(data.retrieval, part="retrieval", fmt="onnx", out=out)


def _pixels(pred, paths):
    """Resized images in [0, 1]: the exported graph's input (no normalisation outside)."""
    from PIL import Image
    from torchvision.transforms import functional as F

    return torch.stack([F.to_tensor(Image.open(p).convert("RGB").resize((pred.img_size, pred.img_size), Image.BICUBIC)) for p in paths])


def test_retrieval_onnx_matches_eager_and_gives_the_same_topk(data, retrieval_onnx):
    assert retrieval_onnx.max_abs_diff <= 1e-4
    spec = read_spec(retrieval_onnx.path)
    assert spec.part == "retrieval" and spec.inputs == ["pixels", "text_ids"] and spec.mean == [0.5, 0.5, 0.5] and spec.pad_id == 1
    pred = P.load_predictor(data.retrieval, device="cpu")
    paths = P.list_images([data.images])
    texts = ["a red square", "a blue square", "a green square", "yellow"]
    enc = pred.tokenizer(texts, max_len=9)  # a text length (9) and batches (8 images, 4 texts) the trace never saw
    assert enc["padding_mask"].sum() > 0
    image_emb, text_emb, sim = onnx_outputs(retrieval_onnx.path, [_pixels(pred, paths), enc["language_tokens"]])
    want_img, _, _ = P.embed_images(pred, paths)  # eager, with the predictor's own transform + normalisation
    want_txt = P.embed_texts(pred, texts)
    np.testing.assert_allclose(image_emb, want_img, atol=1e-4)
    np.testing.assert_allclose(text_emb, want_txt, atol=1e-4)
    np.testing.assert_allclose(sim, image_emb @ text_emb.T, atol=1e-5)
    k = 3  # the same top-k gallery images for every text query
    assert (np.argsort(-sim.T, axis=1)[:, :k] == np.argsort(-(want_txt @ want_img.T), axis=1)[:, :k]).all()


def test_padding_mask_is_computed_from_pad_ids_in_the_graph(data, retrieval_onnx):
    pred = P.load_predictor(data.retrieval, device="cpu")
    short, padded = pred.tokenizer(["a red square"], max_len=6), pred.tokenizer(["a red square"], max_len=14)
    pixels = torch.rand(1, 3, pred.img_size, pred.img_size)
    _, t_short, _ = onnx_outputs(retrieval_onnx.path, [pixels, short["language_tokens"]])
    _, t_padded, _ = onnx_outputs(retrieval_onnx.path, [pixels, padded["language_tokens"]])
    np.testing.assert_allclose(t_short, t_padded, atol=1e-5)  # padding ignored: the mask came from the ids
    with torch.no_grad():  # without a mask the pads would change the embedding
        unmasked = pred.model.encode_text(padded["language_tokens"]).numpy()
    assert np.abs(unmasked - t_padded).max() > 1e-3


def test_vqa_onnx_and_vision_pt2(data, tmp_path):
    spec = export_model(data.vqa, part="vqav2", fmt="onnx", out=tmp_path / "vqa.onnx")
    assert spec.max_abs_diff <= 1e-4 and spec.labels == ["red", "green", "blue", "yellow"]
    pred = P.load_predictor(data.vqa, device="cpu")
    paths = P.list_images([data.images])[:3]
    enc = pred.tokenizer(["what color is the square"] * 3, max_len=10)
    (logits,) = onnx_outputs(spec.path, [_pixels(pred, paths), enc["language_tokens"]])
    with torch.no_grad():
        images = torch.stack(P.read_images(paths, pred.transform)[0])
        want = pred.model(image=images, question=enc["language_tokens"], padding_mask=enc["padding_mask"]).numpy()
    np.testing.assert_allclose(logits, want, atol=1e-4)

    spec = export_model(data.retrieval, part="vision", fmt="pt2", out=tmp_path / "vision.pt2")
    program = torch.export.load(spec.path)
    pixels = torch.rand(5, 3, 32, 32)
    with torch.no_grad():
        want = P.load_predictor(data.retrieval, device="cpu").model.encode_image((pixels - 0.5) / 0.5)
    torch.testing.assert_close(program.module()(pixels), want, atol=1e-5, rtol=0)
    assert read_spec(spec.path).outputs == ["image_embeds"]


def test_unexportable_and_mismatched_parts_fail_clearly_without_a_file(data, tmp_path):
    with pytest.raises(ExportError, match="beam search"):
        export_model(data.captioner, part="captioning", fmt="onnx", out=tmp_path / "cap.onnx")
    with pytest.raises(ExportError, match="needs a retrieval model, got a captioning model"):
        export_model(data.captioner, part="vision", fmt="onnx", out=tmp_path / "v.onnx")
    with pytest.raises(ExportError, match="unknown --format"):
        export_model(data.retrieval, part="vision", fmt="tflite", out=tmp_path / "v.tflite")
    assert not list(tmp_path.iterdir())
