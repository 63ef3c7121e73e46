"""``multiway serve`` — the web demo over an index and up to three models (see :mod:`multiway.serve`)."""

from __future__ import annotations


def _serve(args) -> int:
    from ..config import config_from_args
    from .app import ServeConfig, serve

    flags = {"model": args.model, "captioner": args.captioner, "vqa": args.vqa, "index": args.index, "tokenizer": args.tokenizer,
             "host": args.host, "port": args.port}
    cfg = config_from_args(ServeConfig, args, updates={k: v for k, v in flags.items() if v is not None})
    if not (cfg.index or cfg.model or cfg.captioner or cfg.vqa):
        raise SystemExit("serve: give at least --index DIR (search), --captioner or --vqa")
    serve(cfg)
    return 0


def add_commands(subparsers) -> None:
    from ..config import add_config_arguments

    p = subparsers.add_parser("serve", help="the web demo: search an index, caption and question images (FastAPI)",
                              description="Binds to 127.0.0.1 unless --host says otherwise. Settings of ServeConfig (upload "
                                          "limits, workers, batching) as KEY=VALUE overrides.")
    p.add_argument("--model", help="retrieval model (default: the one the index was built with)")
    p.add_argument("--captioner", help="captioning model folder or .safetensors")
    p.add_argument("--vqa", help="VQAv2 model folder or .safetensors")
    p.add_argument("--index", help="an index folder from `multiway index build`")
    p.add_argument("--tokenizer", help="SentencePiece model when the model folders do not record one")
    p.add_argument("--host", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8080)")
    add_config_arguments(p, config_help="a YAML file of ServeConfig fields")
    p.set_defaults(func=_serve)
