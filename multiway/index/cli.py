"""``multiway index build | add | search`` — see :mod:`multiway.index`."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

_OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*=")


def _split_overrides(items: list[str]) -> tuple[list[str], list[str]]:
    """Image arguments and ``key=value`` overrides share the positional list: an item is an override when it looks
    like ``key=value`` and is not an existing path."""
    images = [i for i in items if not (_OVERRIDE.match(i) and not Path(i).exists())]
    return images, [i for i in items if i not in images]


def _print_report(report, as_json: bool) -> int:
    for err in report.errors:
        print(f"skipped: {err}", file=sys.stderr)
    if as_json:
        print(json.dumps(report.to_dict()))
    else:
        ranks = f" ({' + '.join(map(str, report.per_rank))} by rank)" if len(report.per_rank) > 1 else ""
        print(f"{report.index_dir}: {report.vectors} vectors ({report.kind}); this run embedded {report.embedded}{ranks}, "
              f"{report.unchanged} unchanged, {len(report.errors)} unreadable, {report.removed} removed"
              + (f", {report.merged} recovered from an interrupted run" if report.merged else ""))
    return 0


def _build(args) -> int:
    import os

    from ..config import config_from_args
    from .build import IndexConfig, build_index

    images, overrides = _split_overrides(args.images or [])
    args.overrides = [*getattr(args, "overrides", []), *overrides]
    updates = {k: v for k, v in {"model": args.model, "batch_size": args.batch_size, "kind": args.kind, "tokenizer": args.tokenizer}.items()
               if v is not None}
    cfg = config_from_args(IndexConfig, args, updates=updates)
    if args.command_name == "add" and not (Path(args.out) / "meta.sqlite").is_file():
        raise SystemExit(f"index add: {args.out} is not an index folder; "
                         f"create it with `multiway index build IMAGES --model M --out {args.out}`")
    if not images:
        if args.command_name == "build":
            raise SystemExit("index build: give the image folders or files to index")
        images = _roots_of(args.out)
    report = build_index(images, args.out, cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        _print_report(report, args.json)
    return 0


def _roots_of(out: str) -> list[str]:
    """The folders and files an index was built from (``index add DIR`` with no IMAGES rescans them)."""
    from .store import META_FILE, connect, read_info

    conn = connect(Path(out) / META_FILE)
    try:
        return list(read_info(conn).get("roots", []))
    finally:
        conn.close()


def _search(args) -> int:
    from .build import embed_query, load_search_predictor

    if not args.query and not args.image_query:
        raise SystemExit("index search: give --query TEXT and/or --image-query FILE")
    index, pred = load_search_predictor(args.index_dir, model=args.model, tokenizer=args.tokenizer)
    try:
        q = embed_query(pred, text=args.query, image=args.image_query)
    except ValueError as e:
        raise SystemExit(f"index search: {e}") from None
    hits = index.search(q[None], k=args.topk)[0]
    if args.json:
        print(json.dumps({"query": args.query, "image_query": args.image_query, "hits": [h.to_dict() for h in hits]}))
    else:
        for h in hits:
            print(f"{h.score:.4f}  {h.path}")
    return 0


def add_commands(subparsers) -> None:
    from ..config import add_config_arguments

    p = subparsers.add_parser("index", help="a FAISS image index: build, add (incremental), search")
    sub = p.add_subparsers(dest="index_command", metavar="COMMAND", required=True)
    for name, help_text in (("build", "embed a collection into a new (or interrupted) index folder"),
                            ("add", "embed only the new or changed files (path, mtime, size) into an existing index")):
        q = sub.add_parser(name, help=help_text, description=f"{help_text}. Run again after a kill to resume. Under torchrun each "
                                                            "rank embeds its shard and rank 0 merges.")
        if name == "build":
            q.add_argument("images", nargs="*", metavar="IMAGES", help="image folders (recursive) or files; KEY=VALUE items are overrides")
            q.add_argument("--out", required=True, help="the index folder")
        else:
            q.add_argument("out", metavar="DIR", help="the index folder")
            q.add_argument("images", nargs="*", metavar="IMAGES", help="folders or files to add (default: the index's roots again)")
        q.add_argument("--model", help="retrieval model: a multiway finetune output folder or a .safetensors (build: required)")
        q.add_argument("--tokenizer", help="SentencePiece model when the model folder does not record one")
        q.add_argument("--batch-size", dest="batch_size", type=int)
        q.add_argument("--kind", choices=["auto", "flat", "ivfpq"], help="vector index: exact, IVF-PQ, or by size (ivfpq_threshold)")
        q.add_argument("--json", action="store_true", help="print the build report as JSON")
        add_config_arguments(q, config_help="a YAML file of IndexConfig fields")
        q.set_defaults(func=_build, command_name=name)
    s = sub.add_parser("search", help="search an index with a text and/or an image query")
    s.add_argument("index_dir", metavar="DIR")
    s.add_argument("--query", help="text query")
    s.add_argument("--image-query", dest="image_query", help="image file query")
    s.add_argument("--topk", type=int, default=5)
    s.add_argument("--model", help="override the retrieval model the index records")
    s.add_argument("--tokenizer", help="override the tokenizer the model folder records")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_search)
