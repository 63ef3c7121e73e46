"""``multiway tokenizer ...``: train text (SentencePiece) and visual (VQ-KD) tokenizers."""

from __future__ import annotations

import argparse
import json

from ..config import add_config_arguments, config_from_args


def _train_text(args: argparse.Namespace) -> int:
    from multiway.tokenizers.text import train_text_tokenizer

    path = train_text_tokenizer(args.corpus, args.out, vocab_size=args.vocab_size, model_type=args.model_type,
                                character_coverage=args.character_coverage, seed=args.seed,
                                hard_vocab_limit=not args.soft_vocab_limit)
    print(path)
    return 0


def _train_visual(args: argparse.Namespace) -> int:
    from multiway.tokenizers.vqkd_training import VQKDTrainConfig, train_vqkd

    updates = {k: v for k, v in (("data", args.data), ("out", args.out)) if v is not None}
    cfg = config_from_args(VQKDTrainConfig, args, updates=updates)
    metrics = train_vqkd(cfg, resume=not args.no_resume)
    print(json.dumps(metrics, indent=1))
    return 0


def _probe_visual(args: argparse.Namespace) -> int:
    from multiway.tokenizers.vqkd_training import probe_visual_tokenizer

    print(json.dumps(probe_visual_tokenizer(args.tokenizer, args.data), indent=1))
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    tok = subparsers.add_parser("tokenizer", help="train text and visual tokenizers")
    sub = tok.add_subparsers(dest="tokenizer_command", metavar="COMMAND", required=True)

    p = sub.add_parser("train", help="train a SentencePiece model on text files (one sentence per line)")
    p.add_argument("corpus", nargs="+", help="text files")
    p.add_argument("--out", required=True, help="output prefix; writes <out>.model and <out>.vocab")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--model-type", default="unigram", choices=["unigram", "bpe", "char", "word"])
    p.add_argument("--character-coverage", type=float, default=0.9995)
    p.add_argument("--soft-vocab-limit", action="store_true", help="allow fewer pieces than --vocab-size")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_train_text)

    p = sub.add_parser(
        "train-visual", help="train a VQ-KD visual tokenizer against a frozen teacher (through the training loop)",
        description="Settings are VQKDTrainConfig keys: preset=, model.n_code=512, teacher=timm:<name> "
        "teacher_weights=<file>, batch_size=, train.max_steps=, train.lr=, train.max_minutes=, train.out_dir= ...",
    )
    p.add_argument("data", nargs="?", default=None, help="folder of images, searched recursively (sets data=)")
    p.add_argument("--out", default=None, help="output .safetensors file (sets out=)")
    p.add_argument("--no-resume", action="store_true", help="start over even if the run folder has checkpoints")
    add_config_arguments(p, "a YAML file of VQKDTrainConfig keys")
    p.set_defaults(func=_train_visual)

    p = sub.add_parser("probe-visual", help="linear probe of bag-of-codes on an ImageNet-style index")
    p.add_argument("tokenizer", help="a VQ-KD .safetensors file")
    p.add_argument("data", help="folder with imagenet.{train,val}.index.jsonl (e.g. <synth>/imagenet)")
    p.set_defaults(func=_probe_visual)
