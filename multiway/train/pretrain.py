"""BEiT-3 pretraining: masked data modeling over text, image and image-text streams, mixed every step.

``multiway pretrain --config configs/pretrain_tiny.yaml`` runs :func:`pretrain`, which

1. on the built-in data (``data.builtin: true``) generates the shapes data set in ``data.dir`` if missing (the
   streams and ``text_tokenizer`` must then name files inside ``data.dir``);
2. gets the visual tokenizer: ``tokenizer.visual`` (a VQ-KD file), or — when that is empty — trains a small VQ-KD
   against the ``pixels`` teacher on the training images once and caches it as ``<data.dir>/vqkd_<preset>_pixels.safetensors``;
3. builds :class:`~multiway.BEiT3ForPretraining` and a :class:`PretrainTask`, and calls :func:`multiway.train.train`.

Paths (``data.*`` sources, ``text_tokenizer``, ``visual_tokenizer``, ``data.dir``, ``train.out_dir``) follow the
one rule of every command (:func:`multiway.config.resolve_path`): relative paths are read from the working
directory.

Each optimizer step sees ``batch.text`` texts (15% of tokens masked), ``batch.image`` images (40% of patches
masked block-wise, targets = VQ-KD tokens of the same augmented view) and ``batch.pair`` pairs (50% of the text
masked; optionally the image too), times ``train.accum_steps``. Visual tokens are computed on the fly on the
training device (``visual_tokens: online``) or read from the shards (``precomputed``: ``visual_tokens.npy`` /
json ``visual_tokens``; geometric augmentation is then switched off so the tokens stay aligned).

Determinism: every stream has its own RNG (workers seeded from ``(seed, rank, stream)``; masks drawn from
``(seed, rank, stream, batch index)``), so the global RNG of the training loop is untouched and a resumed run
replays the data exactly (by re-reading the skipped batches — cheap at laptop scale, slow for huge runs).
"""

from __future__ import annotations

import json
import random
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from ..config import check_literals, from_dict, load_config, resolve_path, to_dict
from ..log import get_logger
from .config import TrainConfig
from .loop import train
from .objectives import masked_accuracy_counts, mdm_loss, pair_contrastive_loss
from .rng import mix_seeds

logger = get_logger(__name__)


def _stream_id(name: str) -> int:
    """A stable number per stream name for seeding, distinct for every stream ("text" and "pair" have one length)."""
    return zlib.crc32(name.encode())


@dataclass
class DataConfig:
    """Where the pretraining streams come from (``data:`` of a pretraining config)."""

    # the built-in data's folder (data.builtin) and the cache of an auto-trained VQ-KD; every path here is read
    # from the working directory when relative, like every path of every command
    dir: str = "multiway_data/shapes"
    builtin: bool = True  # generate the shapes data set in `dir` if it is missing (the sources must lie inside `dir`)
    builtin_num_images: int = 2000
    text: str | list[str] | None = "multiway_data/shapes/corpus.txt"  # .txt / .jsonl / tar shards
    image: str | list[str] | None = "multiway_data/shapes/shards"  # tar shards / image folder / jsonl with image_path
    pair: str | list[str] | None = "multiway_data/shapes/shards"  # tar shards (img + txt) / jsonl (image_path + text)
    # held-out pairs (their texts and images serve all streams)
    eval_pairs: str | None = "multiway_data/shapes/coco_retrieval.val.jsonl"
    eval_size: int = 256
    num_workers: int = 0
    text_max_len: int = 32  # text-only stream, with specials
    pair_max_len: int = 32


@dataclass
class PretrainConfig:
    """A pretraining run: the model, the tokenizers, the masking of each stream, the data and the training loop."""

    model: str = "beit3_tiny_patch8_32"  # a preset name (multiway.PRESETS)
    model_overrides: dict[str, Any] = field(default_factory=lambda: {"drop_path_rate": 0.1})  # MultiwayConfig fields
    text_tokenizer: str = "multiway_data/shapes/shapes.spm"  # SentencePiece model
    visual_tokenizer: str | None = None  # VQ-KD .safetensors; None = train a tiny one (cached in data.dir)
    vqkd_preset: str = "vqkd_tiny_patch8_32"  # the VQ-KD trained when visual_tokenizer is None
    vqkd_steps: int = 300  # its training steps
    vqkd_images: int = 4096  # at most this many images of data.image (else data.pair) train it
    # "online": visual tokens computed on the training device; "precomputed": read from the shards
    visual_tokens: Literal["online", "precomputed"] = "online"
    # per rank and micro-batch, by stream (text, image, pair); paper: 2048 each
    batch: dict[str, int] = field(default_factory=lambda: {"text": 32, "image": 32, "pair": 32})
    text_mask_ratio: float = 0.15  # of the text-only stream's tokens
    pair_text_mask_ratio: float = 0.5  # of the pairs' text tokens
    image_mask_ratio: float = 0.4  # of the image patches, block-wise
    pair_image_mask_ratio: float = 0.0  # > 0 also masks the image of pairs
    # > 0 adds an image-text contrastive loss on the pairs (dual-encoder heads, as the official *_itc checkpoints
    # carry): the retrieval [CLS] outputs, which masked data modeling never trains, learn from the pairs too
    itc_weight: float = 0.0
    text_replace_probs: tuple[float, float, float] = (1.0, 0.0, 0.0)  # masked tokens become (mask, random, kept)
    color_jitter: float = 0.4  # image augmentation strength
    crop_scale: tuple[float, float] = (0.5, 1.0)  # RandomResizedCrop area range
    hflip: bool = True  # random horizontal flips
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(out_dir="runs/pretrain_tiny", max_steps=300))

    def __post_init__(self) -> None:
        check_literals(self)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PretrainConfig:
        return from_dict(cls, d)


def load_pretrain_config(path: str | Path | None, overrides: Sequence[str] = ()) -> PretrainConfig:
    """A YAML config (``None``: the defaults) with ``key.sub=value`` overrides (values parsed as YAML)."""
    return load_config(PretrainConfig, path, overrides)


# --- data -----------------------------------------------------------------------------------------------


def _sources(src: str | list[str] | None, key: str) -> str | list[str] | None:
    """A stream's source(s) by the one path rule (:func:`multiway.config.resolve_path`); globs and brace ranges
    stay patterns (the streams expand them)."""
    if src is None:
        return None
    if isinstance(src, (list, tuple)):
        return [str(resolve_path(s, key)) for s in src]
    return str(resolve_path(src, key))


class _PrivateRNG:
    """Runs each ``next()`` of an iterator under its own torch/python/numpy RNG states (seeded once).

    With ``num_workers=0`` the transforms then never touch the training loop's global RNG.
    """

    def __init__(self, it: Iterator, seed: int):
        self.it = it
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.torch = torch.get_rng_state()
        self.py = random.Random(seed).getstate()
        self.np = np.random.RandomState(seed % 2**32).get_state()

    def __iter__(self):
        return self

    def __next__(self):
        saved = (torch.get_rng_state(), random.getstate(), np.random.get_state())
        torch.set_rng_state(self.torch)
        random.setstate(self.py)
        np.random.set_state(self.np)
        try:
            return next(self.it)
        finally:
            self.torch, self.py, self.np = torch.get_rng_state(), random.getstate(), np.random.get_state()
            torch.set_rng_state(saved[0])
            random.setstate(saved[1])
            np.random.set_state(saved[2])


def _min_block(num_masked: int) -> int:
    """Smallest block for block-wise masking: 16 patches on 14x14 (BEiT), scaled down for tiny grids."""
    return int(min(16, max(2, num_masked // 3)))


class PretrainTask:
    """The :class:`~multiway.train.TrainTask` of BEiT-3 pretraining (see the module docstring)."""

    def __init__(self, cfg: PretrainConfig, model_config, text_tokenizer, visual_tokenizer: nn.Module | None):
        from multiway.data.masking import BlockMaskingGenerator

        self.cfg, self.mcfg = cfg, model_config
        self.tok, self.vqkd = text_tokenizer, visual_tokenizer
        if self.vqkd is not None:
            self.vqkd.eval().requires_grad_(False)
        grid = model_config.img_size // model_config.patch_size
        n = grid * grid
        self.image_masker = BlockMaskingGenerator.from_ratio(
            grid, cfg.image_mask_ratio, min_num_patches=_min_block(round(cfg.image_mask_ratio * n)))
        self.pair_image_masker = (
            BlockMaskingGenerator.from_ratio(
                grid, cfg.pair_image_mask_ratio, min_num_patches=_min_block(round(cfg.pair_image_mask_ratio * n)))
            if cfg.pair_image_mask_ratio > 0
            else None
        )
        if text_tokenizer.vocab_size > model_config.vocab_size:
            raise ValueError(
                f"text tokenizer has {text_tokenizer.vocab_size} ids but the model's text embedding has "
                f"{model_config.vocab_size} rows: set model_overrides.vocab_size >= {text_tokenizer.vocab_size}"
            )
        self._eval_batches: list[dict] | None = None

    # -- transforms and streams --

    def _transform(self, train: bool):
        from multiway.data.transforms import PretrainTransform

        precomputed = self.cfg.visual_tokens == "precomputed"
        tok_size = None if precomputed or self.vqkd is None else self.vqkd.config.img_size
        if not train:
            return PretrainTransform(self.mcfg.img_size, tok_size, scale=(1.0, 1.0), color_jitter=0.0, hflip=False)
        scale = (1.0, 1.0) if precomputed else tuple(self.cfg.crop_scale)
        return PretrainTransform(self.mcfg.img_size, tok_size, scale=scale, color_jitter=self.cfg.color_jitter,
                                 hflip=self.cfg.hflip and not precomputed)

    def _stream(self, name: str, rank: int, world_size: int, seed: int):
        from multiway.data.streams import ImageStream, PairStream, TextStream

        d = self.cfg.data
        src = _sources(getattr(d, name), f"data.{name}")
        common = dict(rank=rank, world_size=world_size, shuffle=True, seed=mix_seeds(seed, 7, _stream_id(name)) % 2**31, repeat=True,
                      on_error="skip")
        if name == "text":
            return TextStream(src, self.tok, max_len=d.text_max_len, **common)
        if name == "image":
            return ImageStream(src, transform=self._transform(True), **common)
        return PairStream(src, transform=self._transform(True), tokenizer=self.tok, max_len=d.pair_max_len, **common)

    # -- collation: masks --

    def _mask_text(self, ids: Tensor, pad: Tensor, ratio: float, rng: np.random.Generator) -> dict[str, Tensor]:
        from multiway.data.masking import mask_text

        length = int((pad == 0).sum(1).max())  # trim padding columns shared by the whole batch
        ids, pad = ids[:, :length], pad[:, :length]
        masked, chosen, _ = mask_text(
            ids, pad, ratio, self.tok.special_ids, self.tok.mask_id, self.tok.mask_id, rng, replace_probs=self.cfg.text_replace_probs
        )
        return {"text_ids": masked, "padding_mask": pad, "text_masked_positions": chosen, "text_targets": ids[chosen]}

    def _mask_image(self, samples: list[dict], masker, rng: random.Random) -> dict[str, Tensor]:
        out = {"image": torch.stack([s["image"] for s in samples])}
        if "tokenizer_image" in samples[0]:
            out["tokenizer_image"] = torch.stack([s["tokenizer_image"] for s in samples])
        elif "visual_tokens" in samples[0]:
            out["visual_tokens"] = torch.stack([s["visual_tokens"] for s in samples])
        elif masker is not None:
            raise ValueError("image samples carry neither a tokenizer view nor precomputed visual_tokens")
        if masker is not None:
            out["image_masked_positions"] = torch.stack([masker(rng, flat=True) for _ in samples])
        return out

    def collate(self, name: str, samples: list[dict], rng_seed: int) -> dict[str, Tensor]:
        rng_np, rng_py = np.random.default_rng(rng_seed), random.Random(rng_seed)
        out: dict[str, Tensor] = {}
        if name in ("text", "pair"):
            ids = torch.stack([s["language_tokens"] for s in samples])
            pad = torch.stack([s["padding_mask"] for s in samples])
            ratio = self.cfg.text_mask_ratio if name == "text" else self.cfg.pair_text_mask_ratio
            out.update(self._mask_text(ids, pad, ratio, rng_np))
        if name == "image":
            out.update(self._mask_image(samples, self.image_masker, rng_py))
        if name == "pair":
            out.update(self._mask_image(samples, self.pair_image_masker, rng_py))
        return out

    # -- TrainTask --

    def train_batches(self, rank: int, world_size: int, seed: int, start_step: int) -> Iterator[dict]:
        loaders = {}
        for name, bs in self.cfg.batch.items():
            if bs <= 0 or getattr(self.cfg.data, name) is None:
                continue
            stream = self._stream(name, rank, world_size, seed)
            loader = torch.utils.data.DataLoader(
                stream,
                batch_size=bs,
                collate_fn=list,
                num_workers=self.cfg.data.num_workers,
                generator=torch.Generator().manual_seed(mix_seeds(seed, rank, _stream_id(name), 3)),
                persistent_workers=self.cfg.data.num_workers > 0,
            )
            loaders[name] = _PrivateRNG(iter(loader), mix_seeds(seed, rank, _stream_id(name), 4))
        if not loaders:
            raise ValueError("pretraining: every stream is disabled (batch sizes 0 or sources None)")
        step = 0
        while True:
            batch = {}
            for name, it in loaders.items():
                samples = next(it)
                if step >= start_step:
                    batch[name] = self.collate(name, samples, mix_seeds(seed, rank, _stream_id(name), step))
            if step >= start_step:
                batch["num_samples"] = sum(len(s.get("text_ids", s.get("image"))) for s in batch.values() if isinstance(s, dict))
                yield batch
            step += 1

    def _targets(self, s: dict) -> dict:
        """Add ``image_targets`` (visual tokens at the masked patches) to a stream dict, computing tokens if needed."""
        if "image_masked_positions" not in s:
            return s
        tokens = s.get("visual_tokens")
        if tokens is None:
            img = s["tokenizer_image"]
            self.vqkd.to(img.device)
            with torch.autocast(img.device.type, enabled=False):
                tokens = self.vqkd.get_codebook_indices(img.float())
        s = dict(s)
        s["image_targets"] = tokens[s["image_masked_positions"].bool()]
        return s

    def loss(self, model: nn.Module, batch: dict) -> tuple[Tensor, dict[str, float]]:
        batch = {k: (self._targets(v) if isinstance(v, dict) else v) for k, v in batch.items()}
        loss, logs = mdm_loss(model, batch)
        if self.cfg.itc_weight > 0 and batch.get("pair"):
            itc, image_to_text_hits, _ = pair_contrastive_loss(model, batch["pair"])
            loss = loss + self.cfg.itc_weight * itc
            logs["itc/loss"], logs["itc/acc"] = itc.detach().item(), image_to_text_hits.float().mean().item()
        return loss, logs

    # -- held-out evaluation --

    def eval_batches(self, device: torch.device) -> list[dict]:
        """Fixed held-out batches (same masks every time) from ``data.eval_pairs``: texts, images, pairs."""
        if self._eval_batches is None:
            from multiway.data.streams import PairStream

            d = self.cfg.data
            stream = PairStream(_sources(d.eval_pairs, "data.eval_pairs"), transform=self._transform(False), tokenizer=self.tok,
                                max_len=d.pair_max_len)
            samples = []
            for s in stream:
                samples.append(s)
                if len(samples) >= d.eval_size:
                    break
            batches, bs = [], 64
            for i in range(0, len(samples), bs):
                chunk = samples[i : i + bs]
                b = {}
                for name in ("text", "image", "pair"):
                    if self.cfg.batch.get(name, 0) > 0:
                        b[name] = self.collate(name, chunk, mix_seeds(12345, i, _stream_id(name)))
                batches.append(b)
            self._eval_batches = batches
        return [{k: {n: t.to(device) for n, t in v.items()} for k, v in b.items()} for b in self._eval_batches]

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Held-out masked-token accuracy per stream, and the majority-class baseline (most frequent target).

        With ``itc_weight > 0`` also ``itc_i2t_acc`` / ``itc_t2i_acc``: image-to-text and text-to-image top-1 among
        the pairs of each held-out batch (up to 64; ``itc_chance`` is the mean 1 / batch size)."""
        if not self.cfg.data.eval_pairs:
            return {}
        device = next(model.parameters()).device
        correct: dict[str, int] = {}
        total: dict[str, int] = {}
        targets: dict[str, list[Tensor]] = {}
        for b in self.eval_batches(device):
            b = {k: self._targets(v) for k, v in b.items()}
            counts = masked_accuracy_counts(model, b)
            if self.cfg.itc_weight > 0 and b.get("pair"):
                _, image_to_text, text_to_image = pair_contrastive_loss(model, b["pair"])
                counts.update(itc_i2t=(int(image_to_text.sum()), image_to_text.numel()),
                              itc_t2i=(int(text_to_image.sum()), text_to_image.numel()))
            for part, (c, t) in counts.items():
                correct[part] = correct.get(part, 0) + c
                total[part] = total.get(part, 0) + t
            for name, s in b.items():
                prefix = "pair_" if name == "pair" else ""
                if "text_targets" in s:
                    targets.setdefault(f"{prefix}text", []).append(s["text_targets"].cpu())
                if "image_targets" in s:
                    targets.setdefault(f"{prefix}image", []).append(s["image_targets"].cpu())
        out = {}
        for part in sorted(total):
            out[f"{part}_acc"] = correct[part] / max(1, total[part])
            if part.startswith("itc_"):
                continue
            t = torch.cat(targets[part if part in targets else "pair_text"])  # pair_text_shuffled: same targets
            out[f"{part}_majority"] = float(torch.bincount(t).max()) / max(1, t.numel())
        if "itc_i2t" in total:
            sizes = [len(b["pair"]["image"]) for b in self.eval_batches(device) if b.get("pair")]
            out["itc_chance"] = len(sizes) / max(1, sum(sizes))
        return out


# --- entry point ----------------------------------------------------------------------------------------


class _StreamImages(torch.utils.data.Dataset):
    """Images read once from a pretraining image source (tar shards, a folder, jsonl with ``image_path``), kept as
    (3, S, S) tensors in [0, 1]; each read is a random resized crop with a flip (VQ-KD's training view)."""

    def __init__(self, source: str | list[str], img_size: int, max_images: int, min_crop_scale: float = 0.5) -> None:
        from torchvision.transforms import v2

        from multiway.data.streams import ImageStream

        resize = v2.Compose([v2.ToImage(), v2.Resize((img_size, img_size), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
                             v2.ToDtype(torch.float32, scale=True)])
        self.images: list[Tensor] = []
        for sample in ImageStream(source, transform=resize, on_error="skip"):
            self.images.append(sample["image"])
            if len(self.images) >= max_images:
                break
        if not self.images:
            raise FileNotFoundError(f"VQ-KD auto-training: no readable image in {source} (data.image / data.pair)")
        self.augment = v2.Compose([v2.RandomResizedCrop(img_size, scale=(min_crop_scale, 1.0), antialias=True,
                                                        interpolation=v2.InterpolationMode.BICUBIC), v2.RandomHorizontalFlip()])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Tensor:
        return self.augment(self.images[i])


def ensure_visual_tokenizer(cfg: PretrainConfig) -> Path:
    """The VQ-KD file to use: ``cfg.visual_tokenizer``, or a tiny one trained with the pixels teacher on the
    configured image stream (``data.image``, else the images of ``data.pair``), cached in ``data.dir``."""
    root = resolve_path(cfg.data.dir, "data.dir")
    if cfg.visual_tokenizer:
        return resolve_path(cfg.visual_tokenizer, "visual_tokenizer", must_exist=True)
    from multiway.tokenizers.vqkd import VQKD_PRESETS
    from multiway.tokenizers.vqkd_training import train_visual_tokenizer

    source = cfg.data.image if cfg.data.image is not None else cfg.data.pair
    if source is None:
        raise ValueError("visual_tokenizer is empty and there is no image stream to train one on: set visual_tokenizer= "
                         "(a VQ-KD .safetensors) or data.image=")
    path = root / f"vqkd_{cfg.vqkd_preset}_pixels_{cfg.vqkd_steps}.safetensors"
    if not path.is_file():
        if cfg.vqkd_preset not in VQKD_PRESETS:
            raise KeyError(f"vqkd_preset: unknown {cfg.vqkd_preset!r}; presets: {', '.join(VQKD_PRESETS)}")
        key = "data.image" if cfg.data.image is not None else "data.pair"
        images = _StreamImages(_sources(source, key), VQKD_PRESETS[cfg.vqkd_preset].img_size, cfg.vqkd_images)
        logger.info("training a %s visual tokenizer (pixels teacher, %d steps) on %d images of %s", cfg.vqkd_preset, cfg.vqkd_steps,
                    len(images), source)
        # a small image set trains with one batch of all of it (the default batch of 64 would not fit)
        metrics = train_visual_tokenizer(images, path, preset=cfg.vqkd_preset, teacher="pixels", steps=cfg.vqkd_steps,
                                         batch_size=min(64, len(images)), num_workers=0, seed=0, progress=cfg.train.progress)
        logger.info("visual tokenizer: %s", json.dumps({k: v for k, v in metrics.items() if k != "path"}))
    return path


def check_builtin_paths(cfg: PretrainConfig) -> None:
    """With ``data.builtin`` the data is generated into ``data.dir``: refuse sources or a text tokenizer outside it
    (a ``data.dir=`` changed without the paths would otherwise train on other data than it generates)."""
    root = resolve_path(cfg.data.dir, "data.dir").resolve()
    named = {f"data.{k}": getattr(cfg.data, k) for k in ("text", "image", "pair", "eval_pairs")}
    named["text_tokenizer"] = cfg.text_tokenizer
    for key, value in named.items():
        for item in [value] if isinstance(value, str) else (value or []):
            path = resolve_path(item, key).resolve()
            if path != root and root not in path.parents:
                raise ValueError(f"{key}={item} is outside data.dir={cfg.data.dir}, where data.builtin=true generates the built-in "
                                 f"data: name it inside data.dir (paths are read from the working directory), or set data.builtin=false")


def pretrain(cfg: PretrainConfig, resume: bool = True) -> dict[str, float]:
    """Run BEiT-3 pretraining as ``cfg`` says (see the module docstring). Returns the final metrics."""
    import multiway
    from multiway.tokenizers import TextTokenizer, load_vqkd

    root = resolve_path(cfg.data.dir, "data.dir")
    if cfg.data.builtin:
        check_builtin_paths(cfg)
    if cfg.data.builtin and not (root / "manifest.json").is_file():
        from multiway.data.shapes import generate_synthetic_dataset

        if root.is_dir() and any(root.iterdir()):
            raise ValueError(f"data.dir={root} holds files but no manifest.json of the built-in data: data.builtin=true only "
                             "generates into a new or empty folder; set data.builtin=false to train on your data there, "
                             "or point data.dir at a new folder")
        generate_synthetic_dataset(root, num_images=cfg.data.builtin_num_images, progress=cfg.train.progress)
    tok = TextTokenizer(resolve_path(cfg.text_tokenizer, "text_tokenizer", must_exist=True))
    vqkd = None
    if cfg.visual_tokens == "online" and cfg.batch.get("image", 0) + (cfg.batch.get("pair", 0) if cfg.pair_image_mask_ratio > 0 else 0) > 0:
        vqkd = load_vqkd(ensure_visual_tokenizer(cfg))
    codebook = vqkd.n_code if vqkd is not None else int(cfg.model_overrides.get("codebook_size", 8192))
    overrides = {k: v for k, v in cfg.model_overrides.items() if k != "codebook_size"}
    torch.manual_seed(cfg.train.seed)
    model = multiway.create_model(f"{cfg.model}_pretraining", codebook_size=codebook, contrastive=cfg.itc_weight > 0, **overrides)
    task = PretrainTask(cfg, model.config, tok, vqkd)
    out = Path(cfg.train.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    import yaml

    (out / "pretrain_config.yaml").write_text(yaml.safe_dump(json.loads(json.dumps(cfg.to_dict())), sort_keys=False))
    return train(model, task, cfg.train, resume=resume)


__all__ = ["DataConfig", "PretrainConfig", "PretrainTask", "check_builtin_paths", "ensure_visual_tokenizer", "load_pretrain_config",
           "pretrain"]
