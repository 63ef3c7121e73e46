"""The one path rule: a relative path in a config or on a command line is read from the working directory, by
every command. Each test puts a decoy where the other reading (the data folder, the run folder) would look, and
fails if the command reads it from there."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from downstream_data import write_downstream_data

import multiway
from multiway import cli
from multiway.config import from_dict, resolve_path
from multiway.downstream.evaluation import evaluate
from multiway.downstream.finetune import FinetuneConfig, finetune
from multiway.downstream.inference import load_predictor
from multiway.downstream.tasks import get_task
from multiway.tokenizers.text import train_text_tokenizer
from multiway.train import pretrain as P


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """``cwd/`` with ``data/`` (tiny VQA indexes and images), ``tok.spm`` beside it, and a tiny VQA model file."""
    cwd = tmp_path_factory.mktemp("cwd")
    corpus = write_downstream_data(cwd / "data", per_color=2)
    spm = train_text_tokenizer([corpus], cwd / "tok", vocab_size=40, hard_vocab_limit=False)
    spm.rename(cwd / "tok.spm")
    torch.manual_seed(0)
    model = multiway.create_model("beit3_tiny_patch8_32_vqav2", num_classes=4)
    task = get_task("vqav2")()
    multiway.save_pretrained(model, cwd / "vqa.safetensors", preprocessing=task.preprocessing(32, 16),
                             task={"task": "vqav2", "model_task": "vqav2", "labels": ["red", "green", "blue", "yellow"]})
    return cwd


def test_resolve_path_reads_relative_paths_from_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "here.txt").write_text("x")
    assert resolve_path("here.txt", "key", must_exist=True).resolve() == tmp_path / "here.txt"
    assert resolve_path("~/x", "key") == Path.home() / "x"
    with pytest.raises(
        FileNotFoundError,
        match=rf"data.text: gone.txt not found \(relative paths are read from the working directory, {tmp_path}"
    ):
        resolve_path("gone.txt", "data.text", must_exist=True)


def test_pretrain_reads_tokenizers_and_streams_from_the_working_directory(tmp_path, monkeypatch):
    data, cwd = tmp_path / "data", tmp_path / "cwd"
    data.mkdir()
    cwd.mkdir()
    for name in ("vq.safetensors", "shapes.spm"):
        (data / name).write_bytes(b"decoy in data.dir")  # read from data.dir, these would be found
    (cwd / "vq.safetensors").write_bytes(b"the one")
    monkeypatch.chdir(cwd)
    cfg = P.load_pretrain_config(None, [f"data.dir={data}", "data.builtin=false", "visual_tokenizer=vq.safetensors",
                                        "text_tokenizer=shapes.spm"])
    assert P.ensure_visual_tokenizer(cfg).resolve() == cwd / "vq.safetensors"
    with pytest.raises(FileNotFoundError, match="text_tokenizer: shapes.spm not found .*working directory"):
        P.pretrain(cfg)
    cfg = P.load_pretrain_config(None, [f"data.dir={data}", "visual_tokenizer=missing.safetensors"])
    with pytest.raises(FileNotFoundError, match="visual_tokenizer: missing.safetensors not found"):
        P.ensure_visual_tokenizer(cfg)
    # the streams' sources too: relative ones stay relative to the working directory
    assert P._sources(["a.jsonl", "shards/*.tar"], "data.pair") == ["a.jsonl", "shards/*.tar"]


def test_finetune_reads_tokenizer_and_init_from_the_working_directory(world, tmp_path, monkeypatch):
    monkeypatch.chdir(world)
    (world / "data" / "only_in_data.spm").write_bytes((world / "tok.spm").read_bytes())  # read from data_dir it would load
    base = {"task": "vqav2", "data_dir": "data", "out_dir": str(tmp_path / "run"), "max_text_len": 16, "batch_size": 4,
            "model": {"preset": "beit3_tiny_patch8_32"}, "train": {"max_steps": 1, "progress": False, "save_every": 0}}
    with pytest.raises(FileNotFoundError, match="tokenizer: only_in_data.spm not found"):
        finetune(from_dict(FinetuneConfig, {**base, "tokenizer": "only_in_data.spm"}))
    with pytest.raises(FileNotFoundError, match="model.init: data/vqa.safetensors not found"):
        finetune(from_dict(FinetuneConfig, {**base, "tokenizer": "tok.spm", "model": {**base["model"], "init": "data/vqa.safetensors"}}))
    result = finetune(from_dict(FinetuneConfig, {**base, "tokenizer": "tok.spm", "model": {**base["model"], "init": "vqa.safetensors"}}))
    assert "vqa_score" in result
    assert json.loads((tmp_path / "run" / "task.json").read_text())["tokenizer"] == str(world / "tok.spm")


def test_evaluate_and_predict_read_model_data_and_tokenizer_from_the_working_directory(world, tmp_path, monkeypatch, capsys):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with pytest.raises(FileNotFoundError, match="model: vqa.safetensors not found .*working directory"):
        evaluate("vqa.safetensors", task="vqav2", data_dir="data", tokenizer="tok.spm")
    monkeypatch.chdir(world)
    result = evaluate("vqa.safetensors", task="vqav2", data_dir="data", tokenizer="tok.spm", out_dir=str(tmp_path / "eval"))
    assert "vqa_score" in result
    pred = load_predictor("vqa.safetensors", tokenizer="tok.spm")
    assert pred.tokenizer is not None
    with pytest.raises(FileNotFoundError, match="tokenizer: data/tok.spm not found"):
        load_predictor("vqa.safetensors", tokenizer="data/tok.spm")
    image = next((world / "data" / "images" / "val").iterdir()).relative_to(world)
    code = cli.main(["predict", "vqa", "--model", "vqa.safetensors", "--tokenizer", "tok.spm", str(image), "--question", "what color?",
                     "--json"])
    assert code == 0 and json.loads(capsys.readouterr().out.splitlines()[0])["path"] == str(image)


def test_study_and_tokenizer_commands_read_from_the_working_directory(world, tmp_path, monkeypatch):
    from multiway.meter.study import ensure_data

    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus.txt").write_text("a red square\na blue circle\n" * 20)
    assert cli.main(["tokenizer", "train", "--corpus", "corpus.txt", "--out", "mine", "vocab_size=30", "hard_vocab_limit=false"]) == 0
    assert list(tmp_path.glob("mine*"))  # written beside the corpus, in the working directory
    (tmp_path / "study_data").mkdir()
    (tmp_path / "study_data" / "coco_retrieval.train.jsonl").write_text("")
    assert ensure_data("study_data") == Path("study_data")
