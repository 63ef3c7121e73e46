"""Data-loading throughput on the built-in data, next to the model's consumption rate.

For each stream (image, text, pair) and one task dataset (VQAv2 train), measures samples/s through a
DataLoader with N workers, and, for the same batch, samples/s of a forward+backward step of
``beit3_small_patch8_64`` (random weights; the column is left out if ``multiway.model`` is unavailable).
Data loading is not the bottleneck when the loader column is above the model column.

    python benchmarks/data_loading.py --data /tmp/synth --workers 0 1 2 --out results/data_loading.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from multiway.data import ImageStream, PairStream, PretrainTransform, TextStream, collate_batch, generate_synthetic_dataset
from multiway.downstream.tasks import DataSettings, get_task
from multiway.tokenizers import TextTokenizer


def loader_rate(dataset, batch_size: int, workers: int, batches: int) -> float:
    """Samples/s after the first batch (which pays for worker start-up)."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                         collate_fn=collate_batch, shuffle=False if isinstance(
                                             dataset, torch.utils.data.IterableDataset) else True)
    it = iter(loader)
    next(it)
    n, t0 = 0, time.perf_counter()
    for _ in range(batches):
        try:
            n += next(it)["batch_size"]
        except StopIteration:
            break
    return n / (time.perf_counter() - t0)


def model_rate(model, batch: dict, kind: str, steps: int) -> float:
    """Samples/s of forward+backward on one batch of the given kind."""
    def step():
        out = model(image=batch.get("image") if kind != "text" else None,
                    text_ids=batch.get("language_tokens") if kind != "image" else None,
                    text_padding_mask=batch.get("padding_mask") if kind != "image" else None)
        out.last_hidden_state.float().pow(2).mean().backward()
    step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch["batch_size"] / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="/tmp/multiway_synth", help="built-in data folder (generated if missing)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=10)
    p.add_argument("--model", default="beit3_small_patch8_64")
    p.add_argument("--model-steps", type=int, default=3)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()

    data = generate_synthetic_dataset(args.data, progress=False)
    tok = TextTokenizer(data / "shapes.spm")
    size = json.loads((data / "manifest.json").read_text())["params"]["img_size"]
    shards = str(data / "shards")
    sets = {
        "image": ("image", lambda: ImageStream(shards, PretrainTransform(size), repeat=True)),
        "text": ("text", lambda: TextStream(data / "corpus.txt", tok, max_len=64, repeat=True)),
        "pair": ("pair", lambda: PairStream(shards, PretrainTransform(size), tok, max_len=64, repeat=True)),
        "vqav2": ("pair", lambda: get_task("vqav2")().build_dataset("train", DataSettings(str(data), tokenizer=tok, img_size=size))),
    }
    model = None
    note = ""
    try:
        from multiway.model import create_model

        model = create_model(args.model).train()
    except Exception as e:  # the model package may be missing or broken in a partial checkout
        note = f"model column left out: {type(e).__name__}: {e}"

    rows = []
    for name, (kind, make) in sets.items():
        row = {"stream": name}
        for w in args.workers:
            row[f"loader_w{w}"] = round(loader_rate(make(), args.batch_size, w, args.batches), 1)
        if model is not None:
            batch = next(iter(torch.utils.data.DataLoader(make(), batch_size=args.batch_size,
                                                          collate_fn=collate_batch)))
            row["model_fwd_bwd"] = round(model_rate(model, batch, kind, args.model_steps), 1)
        rows.append(row)

    cols = list(rows[0])
    print(f"samples/s, batch {args.batch_size}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}"
          + (f", model {args.model}" if model is not None else ""))
    print(" ".join(f"{c:>14}" for c in cols))
    for r in rows:
        print(" ".join(f"{r[c]:>14}" for c in cols))
    if note:
        print(note)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"rows": rows, "batch_size": args.batch_size, "model": args.model, "note": note,
                                   "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                                   "platform": platform.platform(), "torch": torch.__version__}, indent=1))


if __name__ == "__main__":
    main()
