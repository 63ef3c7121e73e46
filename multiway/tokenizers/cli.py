"""``multiway tokenizer ...``: train text (SentencePiece) and visual (VQ-KD) tokenizers."""

from __future__ import annotations

import argparse
import json


def _train_text(args: argparse.Namespace) -> int:
    from multiway.tokenizers.text import train_text_tokenizer

    path = train_text_tokenizer(args.corpus, args.out, vocab_size=args.vocab_size, model_type=args.model_type,
                                character_coverage=args.character_coverage, seed=args.seed,
                                hard_vocab_limit=not args.soft_vocab_limit)
    print(path)
    return 0


def _train_visual(args: argparse.Namespace) -> int:
    from multiway.tokenizers.visual import train_visual_tokenizer

    metrics = train_visual_tokenizer(
        args.data, args.out, preset=args.preset, teacher=args.teacher, teacher_weights=args.teacher_weights,
        steps=args.steps, max_minutes=args.max_minutes, batch_size=args.batch_size, lr=args.lr,
        num_workers=args.workers, device=args.device, seed=args.seed,
        config_overrides=json.loads(args.config) if args.config else None)
    print(json.dumps(metrics, indent=1))
    return 0


def _probe_visual(args: argparse.Namespace) -> int:
    from multiway.tokenizers.visual import probe_visual_tokenizer

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

    p = sub.add_parser("train-visual", help="train a VQ-KD visual tokenizer against a frozen teacher")
    p.add_argument("data", help="folder of images (searched recursively)")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--preset", default="vqkd_tiny_patch8_64")
    p.add_argument("--teacher", default="pixels",
                   help="pixels | timm:<model> (with --teacher-weights) | torchscript:<file> | multiway:<checkpoint>")
    p.add_argument("--teacher-weights", default=None, help="local weights file of a timm teacher")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--max-minutes", type=float, default=None, help="stop after this many minutes")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", default=None, help='JSON overrides of the preset, e.g. \'{"n_code": 512}\'')
    p.set_defaults(func=_train_visual)

    p = sub.add_parser("probe-visual", help="linear probe of bag-of-codes on an ImageNet-style index")
    p.add_argument("tokenizer", help="a VQ-KD .safetensors file")
    p.add_argument("data", help="folder with imagenet.{train,val}.index.jsonl (e.g. <synth>/imagenet)")
    p.set_defaults(func=_probe_visual)
