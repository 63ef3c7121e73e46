"""Worker for the training-loop tests: a tiny MDM run on synthetic data, launched directly or with torchrun.

Usage: python tests/train_worker.py '<json TrainConfig overrides + "batch_size", "nan_at", "drop_path", "itc", "kill_in_save_at">'
("itc": true adds the image-text contrastive loss, negatives gathered across ranks; "kill_in_save_at": k makes the
process SIGKILL itself halfway through writing the state.pt of step k's checkpoint.)
"""

from __future__ import annotations

import json
import sys

import torch

import multiway
from multiway.train import MapDatasetTask, TrainConfig, mdm_loss, train
from multiway.train.objectives import pair_contrastive_loss

CODEBOOK = 64
TEXT_LEN, TEXT_MASKED, IMAGE_MASKED = 12, 3, 6


class SyntheticMDM(torch.utils.data.Dataset):
    """Text ids follow a learnable pattern; image patches are 4 flat colours whose index is the visual token."""

    def __init__(self, n: int = 64, nan_at: tuple[int, ...] = ()):
        self.n, self.nan_at = n, set(nan_at)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        start = int(torch.randint(4, 900, ()))
        ids = torch.arange(start, start + TEXT_LEN) % 1000
        tmask = torch.zeros(TEXT_LEN, dtype=torch.bool)
        tmask[torch.randperm(TEXT_LEN - 1)[:TEXT_MASKED] + 1] = True
        tokens = torch.randint(0, 4, (16,))
        palette = torch.tensor([[1.0, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, -1]])
        image = palette[tokens].T.reshape(3, 4, 4).repeat_interleave(8, 1).repeat_interleave(8, 2)
        imask = torch.zeros(16, dtype=torch.bool)
        imask[torch.randperm(16)[:IMAGE_MASKED]] = True
        return {"ids": ids, "tmask": tmask, "image": image + 0.1 * torch.randn_like(image), "tokens": tokens, "imask": imask, "i": i}


def collate(items: list[dict]) -> dict:
    ids = torch.stack([x["ids"] for x in items])
    tmask = torch.stack([x["tmask"] for x in items])
    tokens = torch.stack([x["tokens"] for x in items])
    imask = torch.stack([x["imask"] for x in items])
    return {
        "text": {
            "text_ids": ids.masked_fill(tmask, 3),
            "padding_mask": torch.zeros_like(ids),
            "text_masked_positions": tmask,
            "text_targets": ids[tmask],
        },
        "image": {"image": torch.stack([x["image"] for x in items]), "image_masked_positions": imask, "image_targets": tokens[imask]},
        "index": torch.tensor([x["i"] for x in items]),
        # the same items as image-text pairs, for the contrastive loss (unmasked ids)
        "pair": {"image": torch.stack([x["image"] for x in items]), "text_ids": ids, "padding_mask": torch.zeros_like(ids)},
    }


def _kill_while_saving(folder: str) -> None:
    """Make torch.save, when it writes ``state.pt`` inside ``folder``, write half of its bytes and SIGKILL the process."""
    import io
    import os
    import signal

    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        path = str(f)
        if folder in path and "state.pt" in path:
            buf = io.BytesIO()
            real_save(obj, buf, *args, **kwargs)
            with open(path, "wb") as out:
                out.write(buf.getvalue()[: len(buf.getvalue()) // 2])
                out.flush()
                os.fsync(out.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, f, *args, **kwargs)

    torch.save = save


def main() -> None:
    args = json.loads(sys.argv[1])
    batch_size = args.pop("batch_size", 4)
    nan_at = set(args.pop("nan_at", []))
    drop_path = args.pop("drop_path", 0.0)
    itc = args.pop("itc", False)
    kill_at = args.pop("kill_in_save_at", None)
    if kill_at is not None:
        _kill_while_saving(f".tmp_step_{kill_at:08d}")
    torch.manual_seed(0)
    model = multiway.create_model("beit3_tiny_patch8_32_pretraining", codebook_size=CODEBOOK, drop_path_rate=drop_path, contrastive=itc)

    def loss_fn(m, batch):
        loss, logs = mdm_loss(m, {k: v for k, v in batch.items() if k != "pair"})
        if itc:
            loss = loss + pair_contrastive_loss(m, batch["pair"])[0]
        if nan_at and any(int(i) in nan_at for i in batch["index"]):
            loss = loss * float("nan")
        return loss, logs

    task = MapDatasetTask(SyntheticMDM(), collate, batch_size, loss_fn)
    cfg = TrainConfig(**{"log_every": 1, "save_every": 1000, "progress": False, "lr": 1e-3, "warmup_steps": 2, **args})
    train(model, task, cfg)


if __name__ == "__main__":
    main()
