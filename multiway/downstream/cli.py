"""``multiway finetune | evaluate | predict | quickstart`` — thin wrappers over :mod:`multiway.downstream`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..config import load_yaml
from .task_specs import TASKS


def _print_result(result, as_json: bool, strict: bool = False) -> int:
    """Rows on stdout, skipped inputs by name on stderr. Exit status 1 when nothing could be processed, or with
    ``strict`` when any input was skipped."""
    for err in result.errors:
        print(f"skipped: {err}", file=sys.stderr)
    for row in result.rows:
        print(json.dumps(row) if as_json else "  ".join(f"{k}={v}" for k, v in row.items()))
    if result.errors:
        print(f"{len(result.errors)} input(s) skipped, {len(result.rows)} processed", file=sys.stderr)
    return 1 if result.errors and (strict or not result.rows) else 0


def _finetune(args) -> int:
    from .finetune import FinetuneConfig, finetune

    overrides = {"task": args.task, "data_dir": args.data_dir, "out_dir": args.out_dir, "init": args.init,
                 "tokenizer": args.tokenizer, "model": args.model, "batch_size": args.batch_size}
    train = {}
    for item in args.set or []:
        key, _, value = item.partition("=")
        if not _:
            raise SystemExit(f"--set expects key=value, got {item!r}")
        (train if key.startswith("train.") else overrides)[key.removeprefix("train.")] = load_yaml(value)
    if args.config:
        cfg = FinetuneConfig.load(args.config, train=train, **overrides)
    else:
        cfg = FinetuneConfig(**{k: v for k, v in overrides.items() if v is not None}, train=train)
    if cfg.task != args.task:
        raise SystemExit(f"{args.config} is a {cfg.task} config but the command says {args.task}")
    print(json.dumps(finetune(cfg), indent=2))
    return 0


def _evaluate(args) -> int:
    from .finetune import evaluate

    result = evaluate(args.model, task=args.task, data_dir=args.data_dir, split=args.split, tokenizer=args.tokenizer,
                      batch_size=args.batch_size, num_beams=args.num_beams, max_len=args.max_len,
                      length_penalty=args.length_penalty, submission=args.submission)
    print(json.dumps(result, indent=2))
    return 0


def _predict(args) -> int:
    from . import predict as P

    pred = P.load_predictor(args.model, tokenizer=args.tokenizer, labels=getattr(args, "labels", None))
    what = args.what
    if what == "caption":
        return _print_result(P.caption(pred, args.inputs, num_beams=args.num_beams, max_len=args.max_len), args.json, args.strict)
    if what == "vqa":
        return _print_result(P.answer(pred, args.inputs, args.question, topk=args.topk), args.json, args.strict)
    if what == "classify":
        return _print_result(P.classify(pred, args.inputs, topk=args.topk), args.json, args.strict)
    if what == "nlvr2":
        return _print_result(P.judge(pred, args.image_a, args.image_b, args.statement), args.json, args.strict)
    if what == "embed":
        out, errors = [], []
        if args.images:
            emb, paths, errors = P.embed_images(pred, args.images)
            for e in errors:
                print(f"skipped: {e}", file=sys.stderr)
            out.append(P.save_embeddings(Path(args.out) / "images", emb, paths)[0])
        if args.texts:
            texts = [t for t in Path(args.texts).read_text().splitlines() if t.strip()]
            out.append(P.save_embeddings(Path(args.out) / "texts", P.embed_texts(pred, texts), texts)[0])
        if not out:
            raise SystemExit("embed: give --images and/or --texts")
        print("\n".join(f"wrote {p}" for p in out))
        return 1 if errors and args.strict else 0
    if what == "search":
        if args.index and Path(args.index).with_suffix(".npy").is_file() and not args.images:
            index = P.SearchIndex.load(args.index)
        else:
            if not args.images:
                raise SystemExit("search: give --images (a folder to index) or an existing --index")
            index, errors = P.build_index(pred, args.images)
            for e in errors:
                print(f"skipped: {e}", file=sys.stderr)
            if errors and args.strict:
                return 1
            if args.index:
                print(f"index saved to {index.save(args.index)}")
        if args.query:
            for hit in P.search_text(pred, index, args.query, k=args.topk):
                print(json.dumps(hit) if args.json else f"{hit['score']:.4f}  {hit['path']}")
        if args.image_query:
            if not args.texts:
                raise SystemExit("search --image-query needs --texts (a file of candidate texts, one a line)")
            texts = [t for t in Path(args.texts).read_text().splitlines() if t.strip()]
            return _print_result(P.search_image(pred, args.image_query, texts, k=args.topk), args.json, args.strict)
        return 0
    raise SystemExit(f"unknown predict command {what}")


def _quickstart(args) -> int:
    from .quickstart import quickstart

    quickstart(out_dir=args.out_dir, fast=args.fast, seed=args.seed, config=args.config)
    return 0


def add_commands(subparsers) -> None:
    tasks = list(TASKS)
    p = subparsers.add_parser("finetune", help="fine-tune a task head (official recipes as YAML presets in configs/)")
    p.add_argument("task", choices=tasks)
    p.add_argument("--config", help="YAML config (configs/finetune_*.yaml); command-line options override it")
    p.add_argument("--data-dir", dest="data_dir")
    p.add_argument("--out-dir", dest="out_dir")
    p.add_argument("--init", help="checkpoint to start from: official .pth, multiway .safetensors; omit for scratch")
    p.add_argument("--tokenizer", help="SentencePiece model (beit3.spm or your own)")
    p.add_argument("--model", help="preset, e.g. beit3_base_patch16_480")
    p.add_argument("--batch-size", dest="batch_size", type=int)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a field, e.g. epochs=2 or train.lr=1e-4")
    p.set_defaults(func=_finetune)

    p = subparsers.add_parser("evaluate", help="evaluate a fine-tuned model with the task's standard metric")
    p.add_argument("task", nargs="?", choices=tasks, help="default: the run's task")
    p.add_argument("--model", required=True, help="a finetune output folder or a multiway .safetensors")
    p.add_argument("--data-dir", dest="data_dir")
    p.add_argument("--split", default="val", help="val, test, test-dev (VQA test splits write the submission json)")
    p.add_argument("--tokenizer")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=64)
    p.add_argument("--num-beams", dest="num_beams", type=int, default=3)
    p.add_argument("--max-len", dest="max_len", type=int)
    p.add_argument("--length-penalty", dest="length_penalty", type=float, default=0.6)
    p.add_argument("--submission", help="VQA: where to write the submission json")
    p.set_defaults(func=_evaluate)

    p = subparsers.add_parser("predict", help="inference on your own files: caption, vqa, classify, nlvr2, embed, search")
    sp = p.add_subparsers(dest="what", metavar="WHAT", required=True)

    def common(q):
        q.add_argument("--model", required=True, help="a finetune output folder or a multiway .safetensors")
        q.add_argument("--tokenizer", help="SentencePiece model (default: the run's)")
        q.add_argument("--json", action="store_true", help="one JSON object per line")
        q.add_argument("--strict", action="store_true", help="exit with status 1 if any input was skipped (named on stderr)")
        q.set_defaults(func=_predict)
        return q

    q = common(sp.add_parser("caption", help="caption images"))
    q.add_argument("inputs", nargs="+", help="image files or folders")
    q.add_argument("--num-beams", dest="num_beams", type=int)
    q.add_argument("--max-len", dest="max_len", type=int)
    q = common(sp.add_parser("vqa", help="answer a question about images"))
    q.add_argument("inputs", nargs="+")
    q.add_argument("--question", required=True)
    q.add_argument("--labels", help="answer2label.txt (default: the run's)")
    q.add_argument("--topk", type=int, default=3)
    q = common(sp.add_parser("classify", help="classify images"))
    q.add_argument("inputs", nargs="+")
    q.add_argument("--labels", help="class names, one a line (default: ids)")
    q.add_argument("--topk", type=int, default=5)
    q = common(sp.add_parser("nlvr2", help="is a statement true of two images?"))
    q.add_argument("image_a")
    q.add_argument("image_b")
    q.add_argument("--statement", required=True)
    q = common(sp.add_parser("embed", help="dual-encoder embeddings to .npy (+ .txt of names)"))
    q.add_argument("--images", nargs="+", help="image files or folders")
    q.add_argument("--texts", help="a text file, one text a line")
    q.add_argument("--out", default="embeddings", help="output folder")
    q = common(sp.add_parser("search", help="index a folder of images; top-k for a text query, or texts for an image"))
    q.add_argument("--images", nargs="+", help="image files or folders to index")
    q.add_argument("--index", help="save the index here (or load it when --images is not given)")
    q.add_argument("--query", help="text query")
    q.add_argument("--image-query", dest="image_query", help="image query (the reverse direction)")
    q.add_argument("--texts", help="candidate texts for --image-query, one a line")
    q.add_argument("--topk", type=int, default=5)

    p = subparsers.add_parser("quickstart", help="synthetic data -> tiny pretraining -> fine-tune + evaluate every mode")
    p.add_argument("--out-dir", dest="out_dir", default="quickstart")
    p.add_argument("--fast", action="store_true", help="a smoke version (about a minute)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", help="YAML of QuickstartConfig fields overriding the preset (tasks: {vqav2: {steps: 500}})")
    p.set_defaults(func=_quickstart)


__all__ = ["add_commands"]
