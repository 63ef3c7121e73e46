"""``multiway tokenizer ...``: train text (SentencePiece) and visual (VQ-KD) tokenizers."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from typing import Literal

from ..config import add_config_arguments, config_from_args


@dataclass
class TextTokenizerConfig:
    """``multiway tokenizer train``: a SentencePiece model on text files (one sentence per line)."""

    corpus: list[str] = field(default_factory=list)  # text files (the positional arguments)
    out: str = ""  # output prefix: writes <out>.model and <out>.vocab (--out)
    vocab_size: int = 8000  # pieces
    model_type: Literal["unigram", "bpe", "char", "word"] = "unigram"  # the SentencePiece algorithm
    character_coverage: float = 0.9995  # fraction of characters covered by the vocabulary
    hard_vocab_limit: bool = True  # False: allow fewer pieces than vocab_size on a small corpus
    seed: int = 0  # SentencePiece's sampling seed

    def __post_init__(self) -> None:
        if not self.corpus or not self.out:
            raise ValueError("tokenizer train needs text files and out (multiway tokenizer train corpus.txt --out my)")


def _train_text(args: argparse.Namespace) -> int:
    from multiway.tokenizers.text import train_text_tokenizer

    updates = {k: v for k, v in (("corpus", args.corpus or None), ("out", args.out)) if v is not None}
    cfg = config_from_args(TextTokenizerConfig, args, updates=updates)
    path = train_text_tokenizer(cfg.corpus, cfg.out, vocab_size=cfg.vocab_size, model_type=cfg.model_type,
                                character_coverage=cfg.character_coverage, seed=cfg.seed,
                                hard_vocab_limit=cfg.hard_vocab_limit)
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
    p.add_argument("--corpus", nargs="+", default=None, help="text files, one sentence per line (sets corpus=)")
    p.add_argument("--out", default=None, help="output prefix; writes <out>.model and <out>.vocab (sets out=)")
    add_config_arguments(p, "a YAML file of TextTokenizerConfig keys (vocab_size, model_type, hard_vocab_limit ...)")
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
