"""A model file carries its tokenizer, preprocessing and task; ``multiway.load`` gives a model and a processor that
predicts from paths, PIL images and tensors with nothing else; official ``.pth`` files ask for ``--model-name``."""

import json

import numpy as np
import pytest
import torch
from downstream_data import write_downstream_data
from PIL import Image

import multiway
from multiway import cli
from multiway.downstream.tasks import get_task
from multiway.model.checkpoints import read_model_extras
from multiway.model.generation import generate
from multiway.tokenizers.text import TextTokenizer, train_text_tokenizer

COLORS = ["red", "green", "blue", "yellow"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("processing")
    corpus = write_downstream_data(root, per_color=1)
    spm = train_text_tokenizer([corpus], root / "spm", vocab_size=40, hard_vocab_limit=False)
    return root, spm


def _saved(root, spm, task_name, **head):
    """A tiny model of ``task_name`` saved with its tokenizer, preprocessing and task (what finetune writes)."""
    torch.manual_seed(0)
    task = get_task(task_name)()
    model = multiway.create_model(f"beit3_tiny_patch8_32_{task.head}", **head)
    path = root / f"{task_name}.safetensors"
    labels = COLORS[: head["num_classes"]] if "num_classes" in head else None
    multiway.save_pretrained(model, path, tokenizer=spm, preprocessing=task.preprocessing(32, 16),
                             task={"task": task_name, "model_task": task.head, "labels": labels})
    return path


def test_file_embeds_tokenizer_and_preprocessing(data):
    root, spm = data
    path = _saved(root, spm, "coco_captioning")
    extras = read_model_extras(path)
    assert extras.preprocessing["img_size"] == 32 and extras.preprocessing["max_text_len"] == 16
    assert extras.task["task"] == "coco_captioning"
    embedded, original = TextTokenizer.from_bytes(extras.tokenizer), TextTokenizer(spm)
    text = "a red square on a blue field"
    assert embedded.text_to_ids(text) == original.text_to_ids(text) and embedded.vocab_size == original.vocab_size


@pytest.mark.parametrize("task_name", ["coco_captioning", "imagenet"])
def test_processor_transform_equals_the_task_eval_transform(data, task_name):
    root, spm = data
    _, processor = multiway.load(str(_saved(root, spm, task_name, **({"num_classes": 4} if task_name == "imagenet" else {}))),
                                 device="cpu")
    image = Image.open(next((root / "images" / "val").glob("*.png"))).convert("RGB").resize((45, 37))
    torch.testing.assert_close(processor.transform(image), get_task(task_name)().eval_transform(32)(image))


def test_caption_from_paths_pil_and_tensors_with_no_tokenizer_argument(data):
    root, spm = data
    model, processor = multiway.load(str(_saved(root, spm, "coco_captioning")), device="cpu")
    files = sorted((root / "images" / "val").glob("*.png"))
    pil = Image.open(files[0]).convert("RGB")
    tensor = torch.from_numpy(np.array(pil)).permute(2, 0, 1).contiguous()  # uint8 (3, H, W)
    res = processor.predict(images=[files[0], pil, tensor], num_beams=1, max_len=6)
    assert [r["path"] for r in res.rows] == [str(files[0]), "<image 1>", "<image 2>"]
    assert res.rows[0]["caption"] == res.rows[1]["caption"] == res.rows[2]["caption"]
    # the low-level path: processor inputs + generate with the tokenizer's ids and vocabulary limit
    out = generate(model, processor(images=[pil])["image"], num_beams=1, max_len=6, **processor.generation_kwargs())
    assert int(out.sequences.max()) < processor.tokenizer.vocab_size
    assert processor.decode(out.sequences) == [res.rows[1]["caption"]]


def test_vqa_retrieval_classification_nlvr2_from_files_alone(data):
    root, spm = data
    files = sorted((root / "images" / "val").glob("*.png"))
    _, vqa = multiway.load(str(_saved(root, spm, "vqav2", num_classes=4)), device="cpu")
    rows = vqa.predict(images=files, text="what color is the square", topk=2).rows
    assert len(rows) == 4 and all(r["answer"] in COLORS and len(r["top"]) == 2 for r in rows)

    _, ret = multiway.load(str(_saved(root, spm, "coco_retrieval")), device="cpu")
    images = ret.predict(images=files)
    texts = ret.predict(text=["a red square", "a blue square"])
    assert images.output.shape == (4, 64) and texts.output.shape == (2, 64)
    np.testing.assert_allclose(np.linalg.norm(images.output, axis=1), 1, atol=1e-5)
    both = ret.predict(images=files[:2], text=["a red square", "a blue square"])
    np.testing.assert_allclose(both.output, images.output[:2] @ texts.output.T, atol=1e-5)
    assert both.rows[0]["hits"][0]["score"] >= both.rows[0]["hits"][1]["score"]

    _, cls = multiway.load(str(_saved(root, spm, "imagenet", num_classes=4)), device="cpu")
    assert all(r["label"] in COLORS for r in cls.predict(images=files).rows)

    _, txt = multiway.load(str(_saved(root, spm, "text_classification", num_classes=3)), device="cpu")
    assert txt.predict(text="a red square").rows[0]["label"] in COLORS[:3]

    _, nlvr2 = multiway.load(str(_saved(root, spm, "nlvr2")), device="cpu")
    row = nlvr2.predict(images=[files[0], Image.open(files[1])], text="both squares are red").rows[0]
    assert 0 <= row["prob_true"] <= 1 and row["image_b"] == "<image 1>"


def test_explicit_tokenizer_overrides_the_embedded_one(data, tmp_path):
    root, spm = data
    corpus = tmp_path / "other.txt"
    corpus.write_text("\n".join(f"zebra quokka number {i} walks" for i in range(200)))
    other = train_text_tokenizer([corpus], tmp_path / "other", vocab_size=30, hard_vocab_limit=False)
    _, processor = multiway.load(str(_saved(root, spm, "coco_retrieval")), tokenizer=other, device="cpu")
    assert processor.tokenizer.vocab_size == TextTokenizer(other).vocab_size != TextTokenizer(spm).vocab_size


def test_task_argument_must_fit_the_head(data):
    root, spm = data
    path = str(_saved(root, spm, "coco_retrieval"))
    _, processor = multiway.load(path, task="flickr30k", device="cpu")
    assert processor.task.name == "flickr30k"
    with pytest.raises(ValueError, match="vqav2"):
        multiway.load(path, task="vqav2", device="cpu")


def test_official_pth_needs_model_name_and_the_error_lists_fitting_presets(data, tmp_path, capsys):
    root, spm = data
    torch.manual_seed(0)
    model = multiway.create_model("beit3_tiny_patch8_32_retrieval")
    pth = tmp_path / "official.pth"
    torch.save({"model": model.state_dict()}, pth)  # the official layout
    with pytest.raises(ValueError, match="beit3_tiny_patch8_32") as e:
        multiway.load(str(pth))
    assert "--model-name" in str(e.value) and "beit3_base_patch16_224" not in str(e.value).split("fit this file:")[1]
    loaded, processor = multiway.load(str(pth), model_name="beit3_tiny_patch8_32_retrieval", tokenizer=spm, device="cpu")
    torch.testing.assert_close(loaded.state_dict()["beit3.text_embed.weight"], model.state_dict()["beit3.text_embed.weight"])
    # the command line: the same one-line error, exit 2
    capsys.readouterr()
    code = cli.main(["predict", "search", "--model", str(pth), "--images", str(root / "images" / "val"), "--query", "red"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "beit3_tiny_patch8_32" in err[0]
    code = cli.main(["convert", str(pth), str(tmp_path / "out.safetensors")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--model-name" in err[0] and "beit3_tiny_patch8_32" in err[0]


def test_convert_embeds_tokenizer_and_labels_so_predict_needs_no_flags(data, tmp_path, capsys):
    root, spm = data
    torch.manual_seed(0)
    pth = tmp_path / "vqa.pth"
    torch.save({"model": multiway.create_model("beit3_tiny_patch8_32_vqav2", num_classes=4).state_dict()}, pth)
    labels = tmp_path / "answer2label.txt"
    labels.write_text("".join(json.dumps({"answer": c, "label": i}) + "\n" for i, c in enumerate(COLORS)))
    out = tmp_path / "vqa.safetensors"
    assert cli.main(["convert", str(pth), str(out), "--model-name", "beit3_tiny_patch8_32_vqav2", "head.num_classes=4",
                     "--tokenizer", str(spm), "--labels", str(labels)]) == 0
    capsys.readouterr()
    image = sorted((root / "images" / "val").glob("*.png"))[0]
    assert cli.main(["predict", "vqa", "--model", str(out), str(image), "--question", "what color is it", "--json"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["answer"] in COLORS


def test_build_index_and_search_return_results(data):
    from multiway.downstream import predict as P

    root, spm = data
    pred = P.load_predictor(str(_saved(root, spm, "coco_retrieval")), device="cpu")
    built = P.build_index(pred, [root / "images" / "val"])
    assert isinstance(built, P.Result) and built.output.embeddings.shape == (4, 64)
    hits = P.search_text(pred, built.output, "a red square", k=2)
    assert isinstance(hits, P.Result) and len(hits.rows) == 2


def test_a_run_folder_moved_away_from_its_tokenizer_uses_the_embedded_copy(data, tmp_path):
    root, spm = data
    run = tmp_path / "run"
    run.mkdir()
    _saved(root, spm, "coco_retrieval").rename(run / "model.safetensors")
    (run / "task.json").write_text(json.dumps({"task": "coco_retrieval", "tokenizer": str(tmp_path / "gone.spm")}))
    _, processor = multiway.load(str(run), device="cpu")
    assert processor.tokenizer.vocab_size == TextTokenizer(spm).vocab_size


def test_load_by_registered_name_and_unknown_names(data):
    _, spm = data
    model, processor = multiway.load("beit3_tiny_patch8_32_retrieval", tokenizer=spm, device="cpu")
    assert processor.task.name == "coco_retrieval" and not model.training
    with pytest.raises(FileNotFoundError, match="neither a file or folder nor a model name"):
        multiway.load("beit3_huge_vqav2")
    with pytest.raises(FileNotFoundError, match="no_such_model.safetensors"):
        multiway.load("no_such_model.safetensors")
