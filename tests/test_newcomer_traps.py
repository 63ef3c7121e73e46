"""The silent traps a newcomer met, each closed: a default fine-tune that builds the paper's base model on a CPU,
relative paths resolved against different folders, built-in data written into the user's folder, and VQ-KD
auto-training reading another folder than the configured image stream."""

import json

import pytest
import torch
from PIL import Image

from multiway import cli
from multiway.train import pretrain as P


def test_finetune_without_config_refuses_a_large_model_on_cpu(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    data, out = tmp_path / "data", tmp_path / "run"
    data.mkdir()
    code = cli.main(["finetune", "vqav2", "--data-dir", str(data), "--out-dir", str(out), "epochs=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "beit3_base_patch16_224" in err[0] and "--config" in err[0] and "model.preset=" in err[0] and "--allow-large" in err[0]
    assert not out.exists()  # refused before anything was built or written


def test_allow_large_and_small_models_pass_the_size_check(monkeypatch):
    from multiway.downstream.finetune import FinetuneConfig, check_model_size

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    from multiway.config import from_dict

    base = from_dict(FinetuneConfig, {"task": "vqav2", "data_dir": "d", "out_dir": "o", "epochs": 1})
    check_model_size(base, config_given=False, allow_large=True)
    check_model_size(base, config_given=True)
    tiny = from_dict(FinetuneConfig, {"task": "vqav2", "data_dir": "d", "out_dir": "o", "epochs": 1,
                                      "model": {"preset": "beit3_tiny_patch8_32"}})
    check_model_size(tiny, config_given=False)
    with pytest.raises(ValueError, match="221M parameters"):
        check_model_size(base, config_given=False)


def test_builtin_data_is_never_written_into_a_folder_with_data_and_no_manifest(tmp_path):
    folder = tmp_path / "my_photos"
    folder.mkdir()
    (folder / "holiday.jpg").write_bytes(b"mine")
    inside = [f"text_tokenizer={folder / 'shapes.spm'}", *(f"data.{k}={folder / k}" for k in ("text", "image", "pair", "eval_pairs"))]
    cfg = P.load_pretrain_config("configs/pretrain_tiny.yaml", [f"data.dir={folder}", f"train.out_dir={tmp_path / 'run'}", *inside])
    with pytest.raises(ValueError, match="holds files but no manifest.json.*data.builtin=false"):
        P.pretrain(cfg)
    assert sorted(p.name for p in folder.iterdir()) == ["holiday.jpg"]


def test_builtin_data_refuses_paths_outside_its_folder(tmp_path):
    """data.dir changed alone: the streams would read the old folder while the data is generated in the new one."""
    cfg = P.load_pretrain_config("configs/pretrain_tiny.yaml", [f"data.dir={tmp_path / 'new'}", f"train.out_dir={tmp_path / 'run'}"])
    with pytest.raises(ValueError, match=r"data.text=multiway_data/shapes/corpus.txt is outside data.dir=.*new"):
        P.pretrain(cfg)
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("layout", ["folder", "jsonl"])
def test_vqkd_auto_training_reads_the_configured_image_stream(tmp_path, monkeypatch, layout):
    root = tmp_path / "data"
    (root / "images" / "train").mkdir(parents=True)
    Image.new("RGB", (40, 40), (0, 0, 0)).save(root / "images" / "train" / "not_these.png")  # the old hard-wired folder
    mine = root / "my_images"
    mine.mkdir()
    for i in range(5):
        Image.new("RGB", (48, 40), (250, 10 * i, 0)).save(mine / f"{i}.png")
    source = "data/my_images"  # config paths: from the working directory; image_path in a jsonl: from the jsonl's folder
    if layout == "jsonl":
        (root / "mine.jsonl").write_text("".join(json.dumps({"image_path": f"my_images/{i}.png"}) + "\n" for i in range(5)))
        source = "data/mine.jsonl"
    monkeypatch.chdir(tmp_path)
    seen = {}

    def fake_train(data, out, **kwargs):
        seen["images"] = [data[i] for i in range(len(data))]
        return {"path": str(out)}

    monkeypatch.setattr("multiway.tokenizers.vqkd_training.train_visual_tokenizer", fake_train)
    cfg = P.load_pretrain_config(None, [f"data.dir={root}", f"data.image={source}", "train.progress=false"])
    P.ensure_visual_tokenizer(cfg)
    assert len(seen["images"]) == 5
    assert all(t.shape == (3, 32, 32) and float(t[0].mean()) > 0.9 for t in seen["images"])  # red: mine, not the black one
