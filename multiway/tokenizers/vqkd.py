"""VQ-KD visual tokenizer (BEiT v2), compatible with the released ``vqkd_encoder_base_decoder_*`` files.

An image goes through a ViT encoder, a small task layer down to ``code_dim``, and an L2-normalised codebook
(nearest code by cosine similarity). At training time a ViT decoder maps the quantized code map back to the
features of a frozen *teacher* and the loss is ``mean(1 - cos(rec, target))`` plus the commitment loss. The
codebook is not trained by gradients: it follows an EMA of the (normalised) means of the vectors assigned to
each code, all-reduced over ranks under ``torch.distributed``.

Key layout (the released files, minus their ``teacher*``, ``scaling*`` and ``loss*`` keys)::

    encoder.{cls_token,pos_embed,patch_embed.proj.*,blocks.N.*,fc_norm.*}
    decoder.{...same...}                       # patch size 1 over the (code_dim, h, w) code map
    quantize.cluster_size                      # usage EMA
    quantize.embedding.{weight,cluster_size,embed_avg,initted}
    encode_task_layer.{0,2}.*   decode_task_layer.{0,2}.*
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..config import from_dict, to_dict

# ----------------------------------------------------------------------------------------------------------------
# config and presets


@dataclass
class VQKDConfig:
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    encoder_dim: int = 768
    encoder_depth: int = 12
    encoder_heads: int = 12
    decoder_dim: int = 768
    decoder_depth: int = 3
    decoder_heads: int = 12
    mlp_ratio: float = 4.0
    n_code: int = 8192
    code_dim: int = 32
    decoder_out_dim: int = 512  # teacher feature width: CLIP-B/16 512, DINO-B/16 768
    decay: float = 0.99
    beta: float = 1.0
    kmeans_init: bool = False  # True: codebook starts empty and is set by k-means on the first batch
    # >0: a code unused for this many training steps is moved onto a random encoder output of the batch.
    # Not in BEiT v2 (0 = off, the official behaviour); it keeps small codebooks alive on small data sets.
    restart_unused_after: int = 0

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VQKDConfig:
        return from_dict(cls, d)


VQKD_PRESETS: dict[str, VQKDConfig] = {
    # the released BEiT v2 tokenizers (ViT-B/16 encoder, 8192 x 32 codebook)
    "vqkd_encoder_base_decoder_1x768x12_clip": VQKDConfig(decoder_depth=1, decoder_out_dim=512),
    "vqkd_encoder_base_decoder_3x768x12_clip": VQKDConfig(decoder_depth=3, decoder_out_dim=512),
    "vqkd_encoder_base_decoder_1x768x12_dino": VQKDConfig(decoder_depth=1, decoder_out_dim=768),
    # the golden-test config (4x4 codes, for beit3_tiny_patch8_32)
    "vqkd_tiny_patch8_32": VQKDConfig(
        img_size=32, patch_size=8, encoder_dim=64, encoder_depth=2, encoder_heads=4, decoder_dim=64,
        decoder_depth=1, decoder_heads=4, n_code=64, code_dim=16, decoder_out_dim=48,
    ),
    # for the built-in data and beit3_small_patch8_64 (8x8 codes), small enough to train on a CPU in minutes;
    # decoder_out_dim is set from the teacher at training time (192 = 8*8*3 for the pixel teacher)
    "vqkd_tiny_patch8_64": VQKDConfig(
        img_size=64, patch_size=8, encoder_dim=64, encoder_depth=2, encoder_heads=4, decoder_dim=64,
        decoder_depth=1, decoder_heads=4, n_code=256, code_dim=16, decoder_out_dim=192, kmeans_init=True,
        restart_unused_after=20,
    ),
}


def vqkd_config(name: str, **overrides: Any) -> VQKDConfig:
    """The preset ``name`` with fields overridden by keyword (an unknown field is refused, naming the valid ones)."""
    if name not in VQKD_PRESETS:
        raise KeyError(f"unknown VQ-KD preset {name!r}; known: {sorted(VQKD_PRESETS)}")
    return from_dict(VQKDConfig, {**to_dict(VQKD_PRESETS[name]), **overrides})


# ----------------------------------------------------------------------------------------------------------------
# ViT (BEiT v2 `VisionTransformer` with abs pos embed, qkv bias as q_bias/v_bias, mean-pooling fc_norm)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        # BEiT's qkv bias: learned for q and v, none for k
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class ViT(nn.Module):
    """Pre-LN ViT that returns ``fc_norm`` of its patch tokens, (B, N, dim); the CLS token is dropped."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, dim: int, depth: int, num_heads: int,
                 mlp_ratio: float) -> None:
        super().__init__()
        self.num_patches = (img_size // patch_size) ** 2
        self.patch_embed = PatchEmbed(patch_size, in_chans, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1, dim))
        self.blocks = nn.ModuleList([Block(dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.fc_norm = nn.LayerNorm(dim, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_weights)
        for i, blk in enumerate(self.blocks):  # BEiT's depth-scaled init of the residual projections
            blk.attn.proj.weight.data.div_(math.sqrt(2.0 * (i + 1)))
            blk.mlp.fc2.weight.data.div_(math.sqrt(2.0 * (i + 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, N, dim)."""
        x = self.patch_embed(x)
        if x.shape[1] != self.num_patches:
            raise ValueError(f"got {x.shape[1]} patches, this ViT was built for {self.num_patches}")
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.fc_norm(x[:, 1:])


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


# ----------------------------------------------------------------------------------------------------------------
# quantizer


def l2norm(t: torch.Tensor) -> torch.Tensor:
    return F.normalize(t, p=2, dim=-1)


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


@torch.no_grad()
def cosine_kmeans(samples: torch.Tensor, num_clusters: int, iters: int = 10,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Spherical k-means of unit vectors (n, d) -> (centroids (k, d) unit rows, counts (k,)).

    Empty clusters keep their previous centroid, as in BEiT v2.
    """
    n, d = samples.shape
    if n >= num_clusters:
        idx = torch.randperm(n, generator=generator, device="cpu")[:num_clusters]
    else:
        idx = torch.randint(0, n, (num_clusters,), generator=generator, device="cpu")
    means = samples[idx.to(samples.device)]
    bins = torch.zeros(num_clusters, device=samples.device)
    for _ in range(iters):
        buckets = (samples @ means.t()).argmax(dim=-1)
        bins = torch.bincount(buckets, minlength=num_clusters).to(samples.dtype)
        sums = torch.zeros_like(means).index_add_(0, buckets, samples)
        new = l2norm(sums / bins.clamp(min=1)[:, None])
        means = torch.where((bins == 0)[:, None], means, new)
    return means, bins


class EmbeddingEMA(nn.Module):
    """The codebook. ``weight`` (n_code, code_dim) has unit rows and is updated by EMA, not by gradients.

    ``cluster_size`` and ``embed_avg`` exist because the released files carry them; BEiT v2's quantizer
    never reads them after k-means init, and neither do we (usage statistics live in the parent's
    ``cluster_size``).
    """

    def __init__(self, n_code: int, code_dim: int, kmeans_init: bool) -> None:
        super().__init__()
        weight = torch.zeros(n_code, code_dim) if kmeans_init else l2norm(torch.randn(n_code, code_dim))
        self.register_buffer("weight", weight)
        self.register_buffer("cluster_size", torch.zeros(n_code))
        self.register_buffer("embed_avg", weight.clone())
        self.register_buffer("initted", torch.tensor([0.0 if kmeans_init else 1.0]))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, self.weight)


class NormEMAVectorQuantizer(nn.Module):
    """Cosine-similarity vector quantizer with an EMA-updated L2-normalised codebook.

    forward(z: (B, C, h, w)) -> (z_q (B, C, h, w) with straight-through gradients, commitment loss, idx (B*h*w,))
    """

    def __init__(self, n_code: int, code_dim: int, beta: float = 1.0, decay: float = 0.99,
                 kmeans_init: bool = False, restart_unused_after: int = 0) -> None:
        super().__init__()
        self.n_code, self.code_dim, self.beta, self.decay = n_code, code_dim, beta, decay
        self.restart_unused_after = restart_unused_after
        self.embedding = EmbeddingEMA(n_code, code_dim, kmeans_init)
        self.register_buffer("cluster_size", torch.zeros(n_code))  # EMA of per-batch code counts (training)
        # steps since each code was last used; not saved, so the state dict keeps the official key set
        self.register_buffer("idle_steps", torch.zeros(n_code, dtype=torch.long), persistent=False)
        self.update = True  # set False to freeze the codebook while training the rest

    @torch.no_grad()
    def _kmeans_init(self, z: torch.Tensor) -> None:
        means, bins = cosine_kmeans(z.float(), self.n_code)
        if dist.is_available() and dist.is_initialized():  # every rank must start from the same codebook
            dist.broadcast(means, 0)
            dist.broadcast(bins, 0)
        self.embedding.weight.copy_(means)
        self.embedding.cluster_size.copy_(bins)
        self.embedding.initted.fill_(1.0)

    @torch.no_grad()
    def _restart_unused(self, unused_now: torch.Tensor, z: torch.Tensor) -> None:
        self.idle_steps.add_(1).masked_fill_(~unused_now, 0)
        dead = torch.nonzero(self.idle_steps >= self.restart_unused_after).flatten()
        if dead.numel() == 0:
            return
        pick = z[torch.randint(0, z.shape[0], (dead.numel(),), device=z.device)]
        if dist.is_available() and dist.is_initialized():  # same replacement vectors on every rank
            dist.broadcast(pick, 0)
        self.embedding.weight[dead] = pick
        self.idle_steps[dead] = 0

    def lookup(self, z: torch.Tensor) -> torch.Tensor:
        """Nearest code of unit vectors z (n, C) -> (n,) long. On unit vectors argmin distance = argmax cosine."""
        w = self.embedding.weight
        d = z.pow(2).sum(dim=1, keepdim=True) + w.pow(2).sum(dim=1) - 2 * z @ w.t()
        return d.argmin(dim=1)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z = l2norm(z.permute(0, 2, 3, 1))  # (B, h, w, C)
        flat = z.reshape(-1, self.code_dim)
        if not self.embedding.initted.item():
            self._kmeans_init(flat.detach())
        idx = self.lookup(flat)
        z_q = self.embedding(idx).view(z.shape)

        if self.training and self.update:
            with torch.no_grad():
                bins = _all_reduce(torch.bincount(idx, minlength=self.n_code).to(flat.dtype))
                self.cluster_size.mul_(self.decay).add_(bins, alpha=1 - self.decay)
                embed_sum = _all_reduce(torch.zeros_like(self.embedding.weight).index_add_(0, idx, flat.detach()))
                zero = bins == 0
                new = l2norm(embed_sum / bins.clamp(min=1)[:, None])
                new = torch.where(zero[:, None], self.embedding.weight, new)  # unused codes keep their vector
                w = self.embedding.weight.mul(self.decay).add_(new, alpha=1 - self.decay)
                self.embedding.weight.copy_(l2norm(w))
                if self.restart_unused_after > 0:
                    self._restart_unused(zero, flat.detach())

        loss = self.beta * F.mse_loss(z_q.detach(), z)
        z_q = z + (z_q - z).detach()  # straight-through estimator
        return z_q.permute(0, 3, 1, 2), loss, idx


# ----------------------------------------------------------------------------------------------------------------
# the tokenizer


class VQKD(nn.Module):
    """VQ-KD tokenizer. Images are in [0, 1]; ``get_codebook_indices`` gives the (B, N) visual tokens."""

    def __init__(self, config: VQKDConfig | None = None) -> None:
        super().__init__()
        c = self.config = config or VQKDConfig()
        self.encoder = ViT(c.img_size, c.patch_size, c.in_chans, c.encoder_dim, c.encoder_depth, c.encoder_heads,
                           c.mlp_ratio)
        self.decoder = ViT(c.grid, 1, c.code_dim, c.decoder_dim, c.decoder_depth, c.decoder_heads, c.mlp_ratio)
        self.quantize = NormEMAVectorQuantizer(c.n_code, c.code_dim, c.beta, c.decay, c.kmeans_init,
                                               c.restart_unused_after)
        self.encode_task_layer = nn.Sequential(
            nn.Linear(c.encoder_dim, c.encoder_dim), nn.Tanh(), nn.Linear(c.encoder_dim, c.code_dim))
        self.decode_task_layer = nn.Sequential(
            nn.Linear(c.decoder_dim, c.decoder_dim), nn.Tanh(), nn.Linear(c.decoder_dim, c.decoder_out_dim))
        self.encode_task_layer.apply(_init_weights)
        self.decode_task_layer.apply(_init_weights)

    @property
    def n_code(self) -> int:
        return self.config.n_code

    @staticmethod
    def pre_process(x: torch.Tensor) -> torch.Tensor:
        """[0, 1] -> [-1, 1], written as the official ``x*255/127.5 - 1``.

        (The official code multiplies by 255 only when ``x.max() <= 1``; we require [0, 1] input instead of a
        data-dependent branch, which also avoids a device sync.)
        """
        return x * 255.0 / 127.5 - 1.0

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pre-processed images (B, 3, H, W) in [-1, 1] -> (quantized (B, code_dim, h, w), idx (B, N), loss)."""
        feats = self.encoder(x)
        with torch.autocast(device_type=x.device.type, enabled=False):  # the task layer runs in fp32
            z = self.encode_task_layer(feats.float())
        B, N, C = z.shape
        h = int(math.isqrt(N))
        z_q, loss, idx = self.quantize(z.transpose(1, 2).reshape(B, C, h, h))
        return z_q, idx.view(B, N), loss

    def decode(self, quantized: torch.Tensor) -> torch.Tensor:
        """(B, code_dim, h, w) -> reconstructed teacher features (B, N, decoder_out_dim)."""
        return self.decode_task_layer(self.decoder(quantized))

    @torch.no_grad()
    def get_codebook_indices(self, images: torch.Tensor) -> torch.Tensor:
        """Visual tokens of images in [0, 1], (B, 3, H, W) -> (B, N) long (row-major over the patch grid)."""
        return self.encode(self.pre_process(images))[1]

    def forward(self, images: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """images (B, 3, H, W) in [0, 1], teacher features target (B, N, decoder_out_dim) -> losses and codes."""
        z_q, idx, quant_loss = self.encode(self.pre_process(images))
        rec = self.decode(z_q)
        rec_loss = (1 - F.cosine_similarity(rec.float(), target.float(), dim=-1, eps=1e-6)).mean()
        return {"loss": rec_loss + quant_loss, "rec_loss": rec_loss.detach(), "quant_loss": quant_loss.detach(),
                "indices": idx}

    # -- weights ------------------------------------------------------------------------------------------------

    def load_official_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True) -> None:
        """Load a released BEiT v2 tokenizer's state dict (``teacher*``/``scaling*``/``loss*`` keys dropped)."""
        sd = {k: v for k, v in state_dict.items() if not k.startswith(("teacher", "scaling", "loss"))}
        own = self.state_dict()
        bad = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
               for k, v in sd.items() if k in own and own[k].shape != v.shape]
        if bad:
            raise ValueError("VQ-KD shape mismatch (wrong preset?):\n  " + "\n  ".join(bad))
        missing, unexpected = self.load_state_dict(sd, strict=False)
        if strict and (missing or unexpected):
            raise KeyError(f"VQ-KD state dict: missing keys {missing}, unexpected keys {unexpected}")


def read_official_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of a released ``.pth`` (read weights-only), bare or under ``model``/``state_dict``."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            return obj[key]
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    raise ValueError(f"{path}: expected a state dict, or a dict with a 'model' or 'state_dict' entry")


def save_vqkd(model: VQKD, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` as safetensors with its config in the metadata; atomic (tmp file, fsync, rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": "multiway.vqkd", "config": json.dumps(model.config.to_dict())}
    if extra:
        meta["extra"] = json.dumps(extra)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata=meta)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_vqkd(path_or_preset: str | os.PathLike, weights: str | os.PathLike | None = None,
              map_location: str | torch.device = "cpu") -> VQKD:
    """Build a VQ-KD tokenizer.

    * ``load_vqkd("tok.safetensors")`` — a file written by :func:`save_vqkd` (config in its metadata);
    * ``load_vqkd("vqkd_encoder_base_decoder_3x768x12_clip", weights="vqkd_..._clip.pth")`` — a preset and a
      released ``.pth`` (read with ``weights_only=True``) or a safetensors state dict;
    * ``load_vqkd("vqkd_tiny_patch8_64")`` — a preset with random weights.
    """
    p = Path(path_or_preset)
    if p.suffix == ".safetensors" and weights is None:
        from safetensors import safe_open

        if not p.is_file():
            raise FileNotFoundError(f"VQ-KD file not found: {p}")
        with safe_open(str(p), "pt", device="cpu") as f:
            meta = f.metadata() or {}
            if "config" not in meta:
                raise ValueError(f"{p}: no 'config' in the safetensors metadata; pass a preset name and weights=")
            model = VQKD(VQKDConfig.from_dict(json.loads(meta["config"])))
            model.load_state_dict({k: f.get_tensor(k) for k in f.keys()})
        return model.to(map_location).eval()
    model = VQKD(vqkd_config(str(path_or_preset)))
    if weights is not None:
        w = Path(weights)
        if not w.is_file():
            raise FileNotFoundError(f"VQ-KD weights not found: {w}")
        if w.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(w))
        else:
            sd = read_official_checkpoint(w)
        model.load_official_state_dict(sd)
    return model.to(map_location).eval()
