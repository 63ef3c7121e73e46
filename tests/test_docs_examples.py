"""Every documented snippet runs: the fenced blocks marked ``python test`` / ``bash test`` of the docs pages below
are executed on tiny data, in order, in a folder that holds what the pages assume (``photos/``, ``beit3.spm``,
tiny model files under the names the pages use, official-layout ``.pth`` files).

The pages name the paper's models; here they run as their tiny counterparts: every ``beit3_base_patch16_<S>``
in a snippet is replaced by ``beit3_tiny_patch8_32`` (the only change made to a snippet). Python blocks of one
page share one namespace; bash blocks run with ``bash -e`` (the ``multiway`` command of this environment).
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from downstream_data import write_downstream_data

import multiway
from multiway.downstream.tasks import get_task
from multiway.tokenizers.text import train_text_tokenizer

REPO = Path(__file__).resolve().parents[1]
PAGES = ["python_api.md", "guide_photos.md", "guide_finetune.md", "guide_pretrain.md", "meter.md"]
BLOCK = re.compile(r"^```(python|bash) test\n(.*?)^```", re.S | re.M)
TINY = (re.compile(r"beit3_base_patch16_(224|384|480)"), "beit3_tiny_patch8_32")
COLORS = ["red", "green", "blue", "yellow"]


def blocks(page: str) -> list[tuple[str, str]]:
    return [(lang, TINY[0].sub(TINY[1], code)) for lang, code in BLOCK.findall((REPO / "docs" / page).read_text())]


def _save(folder: Path, name: str, task_name: str, spm: Path, **head) -> None:
    torch.manual_seed(0)
    task = get_task(task_name)()
    model = multiway.create_model(f"beit3_tiny_patch8_32_{task.head}", **head)
    labels = COLORS[: head["num_classes"]] if "num_classes" in head else None
    multiway.save_pretrained(model, folder / name, tokenizer=spm, preprocessing=task.preprocessing(32, 16),
                             task={"task": task_name, "model_task": task.head, "labels": labels})


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("docs")
    data = root / "_data"
    corpus = write_downstream_data(data, per_color=2)
    spm = train_text_tokenizer([corpus], root / "beit3", vocab_size=40, hard_vocab_limit=False)
    spm.rename(root / "beit3.spm")
    spm = root / "beit3.spm"
    shutil.copytree(data / "images" / "val", root / "photos", ignore=shutil.ignore_patterns("*_1.png"))
    (root / "configs").symlink_to(REPO / "configs")
    (root / "my_data").symlink_to(data)
    (root / "captions.txt").write_text("a red square\na blue square\na green square\n")
    (root / "answer2label.txt").write_text("".join(json.dumps({"answer": c, "label": i}) + "\n" for i, c in enumerate(COLORS)))
    for name, task, head in [("captioner.safetensors", "coco_captioning", {}), ("vqa.safetensors", "vqav2", {"num_classes": 4}),
                             ("search.safetensors", "coco_retrieval", {}), ("classifier.safetensors", "imagenet", {"num_classes": 4}),
                             ("nlvr2.safetensors", "nlvr2", {}),
                             ("text_classifier.safetensors", "text_classification", {"num_classes": 3})]:
        _save(root, name, task, spm, **head)
    for name, model in [("beit3_base_patch16_384_coco_retrieval.pth", "beit3_tiny_patch8_32_retrieval"),
                        ("beit3_base_patch16_480_coco_captioning.pth", "beit3_tiny_patch8_32_captioning"),
                        ("beit3_base_patch16_480_vqa.pth", "beit3_tiny_patch8_32_vqav2")]:
        torch.manual_seed(0)
        head = {"num_classes": 4} if "vqav2" in model else {}
        # the official layout, under the name the snippets use once their model names are made tiny
        torch.save({"model": multiway.create_model(model, **head).state_dict()}, root / TINY[0].sub(TINY[1], name))
    _raw_vqa(root / "raw_vqa")
    return root


def _raw_vqa(root: Path) -> None:
    """A tiny VQAv2 release in the official layout: question/annotation json files under ``vqa/``, COCO-named
    images under ``train2014/``, ``val2014/``, ``test2015/``; every answer asked often enough (>= 9) to be kept."""
    from PIL import Image

    rgb = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}
    (root / "vqa").mkdir(parents=True)
    image_id = 0
    for split, per_color, annotated in (("train2014", 6, True), ("val2014", 4, True), ("test-dev2015", 2, False)):
        folder = root / ("test2015" if split.startswith("test") else split)
        folder.mkdir(exist_ok=True)
        questions, annotations = [], []
        for color, value in rgb.items():
            for _ in range(per_color):
                image_id += 1
                image = Image.new("RGB", (40, 40), (128, 128, 128))
                image.paste(value, (8, 8, 32, 32))
                image.save(folder / f"COCO_{folder.name}_{image_id:012d}.jpg")
                for k, question in enumerate(("what color is the square?", "which color is the shape?")):
                    qid = image_id * 10 + k
                    questions.append({"image_id": image_id, "question": question, "question_id": qid})
                    annotations.append({"question_id": qid, "image_id": image_id, "multiple_choice_answer": color,
                                        "answers": [{"answer": color, "answer_id": j + 1} for j in range(10)]})
        (root / "vqa" / f"v2_OpenEnded_mscoco_{split}_questions.json").write_text(json.dumps({"questions": questions}))
        if annotated:
            (root / "vqa" / f"v2_mscoco_{split}_annotations.json").write_text(json.dumps({"annotations": annotations}))


@pytest.mark.parametrize("page", PAGES)
def test_page_snippets_run(page, workdir, monkeypatch):
    found = blocks(page)
    assert found, f"docs/{page} has no tested snippet"
    monkeypatch.chdir(workdir)
    namespace: dict = {"__name__": "__docs__"}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for n, (lang, code) in enumerate(found, 1):
        if lang == "python":
            exec(compile(code, f"docs/{page} block {n}", "exec"), namespace)
        else:
            run = subprocess.run(["bash", "-e", "-c", code], cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
            assert run.returncode == 0, (f"docs/{page} block {n} failed:\n{code}\n--- stdout\n{run.stdout[-3000:]}\n"
                                         f"--- stderr\n{run.stderr[-3000:]}")
