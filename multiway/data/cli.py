"""``multiway data ...``: the built-in data set and the official index builders."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

from ..config import add_config_arguments, config_from_args


@dataclass
class SynthConfig:
    """``multiway data synth``: the built-in shapes data set (see :mod:`multiway.data.shapes`)."""

    out: str = ""  # output folder (--out)
    num_images: int = 2000  # scenes (captions, retrieval, VQA); split 80/10/10
    num_pairs: int = 600  # NLVR2 statements; split 80/10/10
    imagenet_per_class: int = 24  # single-shape images per colour_shape class
    img_size: int = 64  # image side in pixels
    vocab_size: int = 500  # SentencePiece pieces of the data set's text tokenizer
    shard_size: int = 500  # image-caption pairs per webdataset shard
    seed: int = 0  # the world's seed
    force: bool = False  # regenerate even if the folder's manifest records the same settings

    def __post_init__(self) -> None:
        if not self.out:
            raise ValueError("data synth needs out (--out DIR)")


def _synth(args: argparse.Namespace) -> int:
    from multiway.data.shapes import generate_synthetic_dataset

    cfg = config_from_args(SynthConfig, args, updates={"out": args.out} if args.out else None)
    out = generate_synthetic_dataset(cfg.out, num_images=cfg.num_images, img_size=cfg.img_size, seed=cfg.seed,
                                     num_pairs=cfg.num_pairs, imagenet_per_class=cfg.imagenet_per_class,
                                     vocab_size=cfg.vocab_size, shard_size=cfg.shard_size, force=cfg.force)
    print(out)
    return 0


def _tokenizer(path: str):
    from multiway.tokenizers.text import TextTokenizer

    return TextTokenizer(path)


def _show(counts: dict) -> int:
    print(json.dumps(counts, indent=1))
    return 0


def _index(args: argparse.Namespace) -> int:
    from multiway.data import raw_indexes as f

    task = args.index_task
    if task in ("coco-retrieval", "flickr30k"):
        name = "coco_retrieval" if task == "coco-retrieval" else "flickr30k"
        return _show(f.build_karpathy_retrieval_index(args.data_dir, _tokenizer(args.tokenizer), args.karpathy_json,
                                                      task=name, image_root=args.image_root))
    if task == "coco-captioning":
        return _show(f.build_coco_captioning_index(args.data_dir, _tokenizer(args.tokenizer), args.karpathy_json,
                                                   image_root=args.image_root))
    if task == "vqav2":
        return _show(f.build_vqav2_index(args.data_dir, _tokenizer(args.tokenizer), args.vqa_dir,
                                         rest_val_images=args.rest_val_images, seed=args.seed))
    if task == "nlvr2":
        return _show(f.build_nlvr2_index(args.data_dir, _tokenizer(args.tokenizer), args.nlvr_dir))
    if task == "imagenet":
        return _show(f.build_imagenet_index(args.data_dir, args.train_dir, args.val_dir))
    if task == "nocaps":
        return _show(f.build_nocaps_index(args.data_dir, args.image_info, split=args.split))
    raise ValueError(task)


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="built-in data and the official dataset indexes")
    sub = data.add_subparsers(dest="data_command", metavar="COMMAND", required=True)

    p = sub.add_parser("synth", help="generate the built-in shapes data set in the official formats")
    p.add_argument("--out", default=None, help="output folder (sets out=)")
    add_config_arguments(p, "a YAML file of SynthConfig keys (num_images, num_pairs, img_size, seed, force ...)")
    p.set_defaults(func=_synth)

    idx = sub.add_parser("index", help="build the official jsonl indexes from the raw public files")
    tasks = idx.add_subparsers(dest="index_task", metavar="TASK", required=True)
    for name, help_ in (("coco-retrieval", "from dataset_coco.json (Karpathy)"),
                        ("flickr30k", "from dataset_flickr30k.json (Karpathy)"),
                        ("coco-captioning", "from dataset_coco.json (Karpathy); also writes caption GT")):
        p = tasks.add_parser(name, help=help_)
        p.add_argument("data_dir")
        p.add_argument("--karpathy-json", required=True)
        p.add_argument("--tokenizer", required=True, help="SentencePiece model (beit3.spm)")
        p.add_argument("--image-root", default=None, help="override the image folder written into image_path")
        p.set_defaults(func=_index)
    p = tasks.add_parser("vqav2", help="from the VQAv2 question/annotation json files (official layout)")
    p.add_argument("data_dir")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--vqa-dir", default=None, help="folder of the raw json files (default: <data_dir>/vqa)")
    p.add_argument("--rest-val-images", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_index)
    p = tasks.add_parser("nlvr2", help="from the NLVR2 repo's data/{train,dev,test1}.json")
    p.add_argument("data_dir")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--nlvr-dir", required=True, help="the nlvr/nlvr2 folder holding data/")
    p.set_defaults(func=_index)
    p = tasks.add_parser("imagenet", help="from class folders <data_dir>/{train,val}/<class>/*")
    p.add_argument("data_dir")
    p.add_argument("--train-dir", default="train")
    p.add_argument("--val-dir", default="val")
    p.set_defaults(func=_index)
    p = tasks.add_parser("nocaps", help="from nocaps_{val,test}_image_info.json")
    p.add_argument("data_dir")
    p.add_argument("--image-info", required=True)
    p.add_argument("--split", default="val", choices=["val", "test"])
    p.set_defaults(func=_index)
