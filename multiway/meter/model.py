"""The METER model: unimodal encoders, projections, fusion, an optional decoder, and the task heads.

Shapes: B batch, T text length, N image tokens (prefix + grid), H fusion width, Dv/Dt encoder widths.

* :class:`METERModel` — everything but the task heads. ``encode(image, ids, pad)`` -> :class:`MeterOutput`;
  ``features(out)`` -> (B, F) the classification feature (``F = 2H`` for encoder-only: pooled text ``[CLS]``
  and pooled image ``[CLS]`` concatenated; ``F = H`` for encoder-decoder: the decoder's class-token output).
* Task wrappers hold a ``meter`` (:class:`METERModel`) plus their heads: :class:`METERForPretraining`,
  :class:`METERForVQA`, :class:`METERForNLVR2`, :class:`METERForRetrieval`, :class:`METERForCaptioning`.
  Build a wrapper around an existing ``METERModel`` to fine-tune a pretrained one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import MeterConfig, get_meter_config
from .encoders import TextEncoder, VisionEncoder
from .fusion import FusionLayer, LayerNorm32, build_fusion, key_mask

TEXT_TYPE, IMAGE_TYPE, IMAGE2_TYPE = 0, 1, 2


@dataclass
class MeterOutput:
    """Fused tokens and the unimodal ``[CLS]`` features they came from.

    text: (B, T, H); image: (B, N, H) (token 0 is the image CLS, or the mean-pooled token for Swin);
    text_padding_mask: (B, T) nonzero = pad; text_cls: (B, Dt); image_cls: (B, Dv).
    """

    text: Tensor
    image: Tensor
    text_padding_mask: Tensor | None
    text_cls: Tensor
    image_cls: Tensor


class Pooler(nn.Sequential):
    """BERT pooler: dense + tanh on the first token."""

    def __init__(self, dim: int):
        super().__init__(nn.Linear(dim, dim), nn.Tanh())

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x[:, 0])


class Decoder(nn.Module):
    """A Transformer decoder over the fused sequence (encoder-decoder architecture).

    ``forward(ids | None, memory, memory_pad)``: ids (B, L) -> hidden (B, L, H) with causal self-attention and
    cross-attention to ``memory`` (B, M, H); ``ids=None`` runs the single learned class token (B, 1, H).
    """

    def __init__(self, cfg: MeterConfig, vocab_size: int):
        super().__init__()
        H, d, f = cfg.fusion.width, cfg.decoder, cfg.fusion
        self.max_len = d.max_len
        self.embed = nn.Embedding(vocab_size, H)
        self.positions = nn.Embedding(d.max_len, H)
        self.cls_query = nn.Parameter(torch.zeros(1, 1, H))
        self.embed_norm = LayerNorm32(H)
        self.layers = nn.ModuleList(
            FusionLayer(H, d.num_heads, d.ffn_dim, True, f.dropout, f.norm_first, f.fp32_attention) for _ in range(d.depth)
        )
        self.norm = LayerNorm32(H) if f.norm_first else nn.Identity()
        self.lm_head = nn.Linear(H, vocab_size)
        for table in (self.embed.weight, self.positions.weight, self.cls_query):
            nn.init.normal_(table, std=cfg.init_std)

    def forward(self, ids: Tensor | None, memory: Tensor, memory_pad: Tensor | None, padding_mask: Tensor | None = None) -> Tensor:
        if ids is None:
            x = self.cls_query.expand(memory.shape[0], -1, -1) + self.positions.weight[:1]
        else:
            if ids.shape[1] > self.max_len:
                raise ValueError(f"decoder input of {ids.shape[1]} tokens exceeds decoder.max_len={self.max_len}")
            x = self.embed(ids) + self.positions(torch.arange(ids.shape[1], device=ids.device))
        x = self.embed_norm(x)
        self_mask, mem_mask = key_mask(padding_mask), key_mask(memory_pad)
        for layer in self.layers:
            x = layer(x, self_mask, memory, mem_mask, causal=ids is not None)
        return self.norm(x)

    def new_cache(self) -> list[dict[str, Tensor]]:
        """An empty key/value cache for :meth:`step`: one dict per layer."""
        return [{} for _ in self.layers]

    def step(self, ids: Tensor, position: int, memory: Tensor, memory_pad: Tensor | None, cache: list[dict[str, Tensor]]) -> Tensor:
        """Incremental decoding: ids (B, 1) at ``position`` -> hidden (B, 1, H), the cache updated in place.

        Feeding positions 0, 1, ... one at a time gives what :meth:`forward` gives on the whole prefix."""
        if position >= self.max_len:
            raise ValueError(f"decoder position {position} exceeds decoder.max_len={self.max_len}")
        x = self.embed_norm(self.embed(ids) + self.positions.weight[position])
        mem_mask = key_mask(memory_pad)
        for layer, layer_cache in zip(self.layers, cache):
            x = layer.step(x, layer_cache, memory, mem_mask)
        return self.norm(x)


class METERModel(nn.Module):
    """Vision encoder + text encoder -> linear projections (+ modality-type embeddings) -> fusion [-> decoder].

    Args:
        cfg: :class:`MeterConfig`.
        pad_id / bos_id / eos_id: the tokenizer's special ids (XLM-R layout by default: 1 / 0 / 2).
    """

    def __init__(self, cfg: MeterConfig, pad_id: int = 1, bos_id: int = 0, eos_id: int = 2):
        super().__init__()
        self.config = cfg
        self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id
        self.encoder_decoder = cfg.architecture == "encoder_decoder"
        extra = cfg.decoder.num_sentinels if self.encoder_decoder else 0
        self.vision = VisionEncoder(cfg.vision)
        self.text = TextEncoder(cfg.text, extra_tokens=extra, pad_id=pad_id)
        self.vocab_size = self.text.vocab_size
        self.sentinel_start = cfg.text.vocab_size  # sentinel i has id vocab_size + i
        H = cfg.fusion.width
        self.width = H
        self.text_proj = nn.Linear(self.text.width, H)
        self.image_proj = nn.Linear(self.vision.width, H)
        self.type_embed = nn.Embedding(3, H)  # text, image, second image (NLVR2)
        self.fusion = build_fusion(cfg.fusion)
        # CLS-less encoders (Swin) under "fused_mean" fuse the bare grid; the image pooler reads the fused mean.
        self.pool_fused_mean = self.vision.num_prefix_tokens == 0 and cfg.image_pooling == "fused_mean"
        self.dual_encoder = cfg.dual_encoder
        if cfg.dual_encoder:
            # dual-encoder projections: candidates for retrieval, similarities for hard-negative ITM
            self.itc_text = nn.Linear(self.text.width, H)
            self.itc_image = nn.Linear(self.vision.width, H)
            self.logit_scale = nn.Parameter(torch.tensor(2.659))  # log(1/0.07)
        if self.encoder_decoder:
            self.decoder = Decoder(cfg, self.vocab_size)
            self.feature_dim = H
        else:
            self.text_pooler = Pooler(H)
            self.image_pooler = Pooler(H)
            self.feature_dim = 2 * H
        self._init_new_layers()

    def _init_new_layers(self) -> None:
        """BERT init (N(0, ``init_std``), zero bias, LN = 1/0) for every module that is not a pretrained encoder."""
        for name, m in self.named_modules():
            if name.split(".")[0] in ("vision", "text"):
                continue
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=self.config.init_std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.type_embed.weight, std=self.config.init_std)

    # --- unimodal -------------------------------------------------------------------------------------------

    def encode_image_tokens(self, image: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, num_image_prefix + grid², Dv); under ``image_pooling="prepend_mean"`` encoders
        without a CLS get the mean-pooled token prepended."""
        v = self.vision(image)
        if self.vision.num_prefix_tokens == 0 and not self.pool_fused_mean:
            v = torch.cat([v.mean(dim=1, keepdim=True), v], dim=1)
        return v

    def image_summary(self, image_tokens: Tensor) -> Tensor:
        """The unimodal image feature (B, Dv): token 0 (CLS or the prepended mean), or the grid mean."""
        return image_tokens.mean(dim=1) if self.pool_fused_mean else image_tokens[:, 0]

    def _require_dual(self) -> None:
        if not self.dual_encoder:
            raise ValueError(
                "this METER model has no dual-encoder projections (dual_encoder=False, as in METER's released "
                "checkpoints); use full fusion re-scoring (multiway.meter.retrieval.rescore_all) instead"
            )

    def encode_text_tokens(self, ids: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """(B, T) -> (B, T, Dt)."""
        return self.text(ids, padding_mask)

    # The dual-encoder (ITC) features are token means, not [CLS]: a randomly initialised encoder's [CLS] barely depends
    # on its input (tiny widths: cosine 0.9-0.9999 between any two inputs at init), and ITC on it falls into the
    # collapsed solution (every logit equal, loss = ln B, vanishing gradients) instead of aligning. Means carry the
    # tokens from step 0. METER's released models have no dual projections, so no official numerics depend on this.

    def dual_text_feature(self, text_tokens: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """Mean of the non-padding text tokens: (B, T, Dt), padding (B, T) nonzero = pad -> (B, Dt)."""
        if padding_mask is None:
            return text_tokens.mean(dim=1)
        keep = (~padding_mask.bool()).unsqueeze(-1).to(text_tokens.dtype)
        return (text_tokens * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1.0)

    def dual_image_feature(self, image_tokens: Tensor) -> Tensor:
        """Mean of the patch/window grid tokens (prefix tokens left out): (B, N, Dv) -> (B, Dv)."""
        return image_tokens[:, self.num_image_prefix :].mean(dim=1)

    def dual_embed_text(self, text_tokens: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """Unimodal text embedding for candidate retrieval: (B, T, Dt) -> (B, H), L2-normalised."""
        self._require_dual()
        return F.normalize(self.itc_text(self.dual_text_feature(text_tokens, padding_mask)).float(), dim=-1)

    def dual_embed_image(self, image_tokens: Tensor) -> Tensor:
        """Unimodal image embedding: (B, N, Dv) -> (B, H), L2-normalised."""
        self._require_dual()
        return F.normalize(self.itc_image(self.dual_image_feature(image_tokens)).float(), dim=-1)

    @property
    def num_image_prefix(self) -> int:
        """Image tokens before the patch grid in fused outputs: 1 (CLS or the prepended mean), 0 under fused_mean."""
        return 0 if self.pool_fused_mean else 1

    # --- fusion ---------------------------------------------------------------------------------------------

    def fuse(
        self, text_tokens: Tensor, image_tokens: Tensor, padding_mask: Tensor | None = None, image_type: int = IMAGE_TYPE
    ) -> MeterOutput:
        """Project both sequences to the fusion width, add modality types, run the fusion module."""
        t = self.text_proj(text_tokens) + self.type_embed.weight[TEXT_TYPE]
        v = self.image_proj(image_tokens) + self.type_embed.weight[image_type]
        out = self.fusion(t, v, padding_mask)
        return MeterOutput(out.text, out.image, padding_mask, text_tokens[:, 0], self.image_summary(image_tokens))

    def encode(self, image: Tensor, text_ids: Tensor, padding_mask: Tensor | None = None, image_type: int = IMAGE_TYPE) -> MeterOutput:
        """image (B, 3, H, W), text_ids (B, T), padding_mask (B, T) -> :class:`MeterOutput`."""
        return self.fuse(self.encode_text_tokens(text_ids, padding_mask), self.encode_image_tokens(image), padding_mask, image_type)

    def memory(self, out: MeterOutput) -> tuple[Tensor, Tensor | None]:
        """The decoder's memory: ``[text; image]`` fused tokens (B, T+N, H) and its padding mask."""
        mem = torch.cat([out.text, out.image], dim=1)
        pad = None
        if out.text_padding_mask is not None:
            pad = F.pad(out.text_padding_mask.bool(), (0, out.image.shape[1]), value=False)
        return mem, pad

    def features(self, out: MeterOutput) -> Tensor:
        """The classification feature (B, feature_dim)."""
        if self.encoder_decoder:
            mem, pad = self.memory(out)
            return self.decoder(None, mem, pad)[:, 0]
        image = out.image.mean(dim=1, keepdim=True) if self.pool_fused_mean else out.image
        return torch.cat([self.text_pooler(out.text), self.image_pooler(image)], dim=-1)

    def decode(self, out: MeterOutput, ids: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """Teacher-forced decoder logits (B, L, vocab) for input ids (B, L)."""
        if not self.encoder_decoder:
            raise ValueError("decode() needs architecture='encoder_decoder'; accepted values for generation: 'encoder_decoder'")
        mem, pad = self.memory(out)
        return self.decoder.lm_head(self.decoder(ids, mem, pad, padding_mask))

    @torch.no_grad()
    def generate(self, image: Tensor, max_len: int = 20, text_ids: Tensor | None = None, **options) -> Tensor:
        """Decode captions (greedy by default; ``num_beams``, ``length_penalty``, ``early_stopping``, ``use_cache``
        as :func:`multiway.meter.generation.generate`). The encoder's text is ``<s></s>`` unless given.

        Returns (B, <= max_len) ids starting after ``<s>``, ``pad`` after ``</s>``.
        """
        from .generation import generate

        if not self.encoder_decoder:
            raise ValueError("generate() needs architecture='encoder_decoder'; accepted values for generation: 'encoder_decoder'")
        seqs = generate(self, image, max_len=min(max_len, self.decoder.max_len - 1) + 1, text_ids=text_ids, **options).sequences
        seqs = seqs[:, 1:]
        width = int((seqs != self.pad_id).sum(1).max().item()) if seqs.numel() else 0
        return seqs[:, : max(width, 1)]


# --- heads ------------------------------------------------------------------------------------------------


class MLMHead(nn.Module):
    """BERT prediction head: dense, GELU, LayerNorm, decoder to the vocabulary. (B, T, H) -> (B, T, V)."""

    def __init__(self, dim: int, vocab_size: int, eps: float = 1e-5):
        super().__init__()
        self.transform = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), LayerNorm32(dim, eps=eps))
        self.decoder = nn.Linear(dim, vocab_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.transform(x))


def classifier(dim_in: int, hidden: int, num_out: int) -> nn.Sequential:
    """METER's task MLP: Linear, LayerNorm, GELU, Linear."""
    return nn.Sequential(nn.Linear(dim_in, hidden), LayerNorm32(hidden), nn.GELU(), nn.Linear(hidden, num_out))


def _init_heads(module: nn.Module, std: float) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class _Wrapper(nn.Module):
    """Holds ``meter``; parameters outside it are heads (the highest lr group).

    ``official_heads`` maps the head prefixes of METER's released checkpoints to this wrapper's modules
    (read by :mod:`multiway.meter.checkpoints`).
    """

    backbone_prefix = "meter."
    official_heads: dict[str, str] = {}

    def __init__(self, meter: METERModel | MeterConfig | str, **model_kwargs):
        super().__init__()
        if isinstance(meter, str):
            meter = get_meter_config(meter)
        self.meter = meter if isinstance(meter, METERModel) else METERModel(meter, **model_kwargs)
        self.config = self.meter.config

    def optim_groups(self, train_cfg: object = None) -> list[dict]:
        """METER's AdamW groups (three lr levels); the shared training loop calls this."""
        from .optim import meter_param_groups

        return meter_param_groups(self, self.config.optim)


class METERForPretraining(_Wrapper):
    """MLM (or span corruption for encoder-decoder: through the decoder's LM head), ITM and MIM heads.

    The MIM head exists when ``objectives.mim`` is on or ``mim_classes`` is given.
    """

    official_heads = {"mlm_score.": "mlm_head.", "itm_score.fc.": "itm_head."}

    def __init__(self, meter: METERModel | MeterConfig | str, mim_classes: int | None = None, **model_kwargs):
        super().__init__(meter, **model_kwargs)
        m = self.meter
        H = m.width
        self.mlm_head = None if m.encoder_decoder else MLMHead(H, m.vocab_size, m.config.fusion.layer_norm_eps)
        self.itm_head = nn.Linear(m.feature_dim, 2)
        patch_pixels = 3 * m.vision.reduction**2
        self.mim_head = None
        if m.config.objectives.mim or mim_classes is not None:
            self.mim_head = nn.Sequential(nn.Linear(H, H), nn.GELU(), LayerNorm32(H), nn.Linear(H, mim_classes or patch_pixels))
        for head in (self.mlm_head, self.itm_head, self.mim_head):
            if head is not None:
                _init_heads(head, self.config.init_std)


class METERForVQA(_Wrapper):
    """VQA as multi-label classification over the answer vocabulary: (B, F) -> (B, num_labels).

    The head is METER's ``vqa_classifier``: Linear(F, F), LayerNorm, GELU, Linear(F, num_labels).
    """

    official_heads = {"vqa_classifier.": "head."}

    def __init__(self, meter: METERModel | MeterConfig | str, num_labels: int, **model_kwargs):
        super().__init__(meter, **model_kwargs)
        F_ = self.meter.feature_dim
        self.head = classifier(F_, F_, num_labels)
        _init_heads(self.head, self.config.init_std)

    def forward(self, image: Tensor, text_ids: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        return self.head(self.meter.features(self.meter.encode(image, text_ids, padding_mask)))


class METERForSNLIVE(METERForVQA):
    """SNLI-VE visual entailment (image premise, text hypothesis): 3 classes (entailment / neutral / contradiction),
    METER's ``snli_classifier`` on the pooled features, trained with cross-entropy."""

    official_heads = {"snli_classifier.": "head."}
    num_classes = 3

    def __init__(self, meter: METERModel | MeterConfig | str, **model_kwargs):
        super().__init__(meter, num_labels=self.num_classes, **model_kwargs)


class METERForNLVR2(_Wrapper):
    """NLVR2: the text is fused with each image (type embeddings 1 and 2); features concatenated -> 2 classes.

    The head is METER's ``nlvr2_classifier``: Linear(2F, F), LayerNorm, GELU, Linear(F, 2).
    """

    official_heads = {"nlvr2_classifier.": "head."}

    def __init__(self, meter: METERModel | MeterConfig | str, **model_kwargs):
        super().__init__(meter, **model_kwargs)
        F_ = self.meter.feature_dim
        self.head = classifier(2 * F_, F_, 2)
        _init_heads(self.head, self.config.init_std)
        # METER starts the second image's type embedding from the first's (pre-training never trains row 2); a
        # released NLVR2 checkpoint loaded afterwards brings its own rows
        with torch.no_grad():
            self.meter.type_embed.weight[IMAGE2_TYPE] = self.meter.type_embed.weight[IMAGE_TYPE]

    def forward(self, image: Tensor, image2: Tensor, text_ids: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        m = self.meter
        t = m.encode_text_tokens(text_ids, padding_mask)
        f1 = m.features(m.fuse(t, m.encode_image_tokens(image), padding_mask, IMAGE_TYPE))
        f2 = m.features(m.fuse(t, m.encode_image_tokens(image2), padding_mask, IMAGE2_TYPE))
        return self.head(torch.cat([f1, f2], dim=-1))


class METERForRetrieval(_Wrapper):
    """Image-text retrieval: the fusion scores a pair (``rank_head``); the dual projections propose candidates."""

    official_heads = {"rank_output.": "rank_head."}

    def __init__(self, meter: METERModel | MeterConfig | str, itm_head: nn.Linear | None = None, **model_kwargs):
        super().__init__(meter, **model_kwargs)
        self.rank_head = nn.Linear(self.meter.feature_dim, 1)
        _init_heads(self.rank_head, self.config.init_std)
        if itm_head is not None:  # as METER: start from the ITM head's "match" row
            with torch.no_grad():
                self.rank_head.weight.copy_(itm_head.weight[1:])
                self.rank_head.bias.copy_(itm_head.bias[1:])

    def score(self, text_tokens: Tensor, image_tokens: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """Fusion score of aligned pairs from unimodal tokens: (B,) float."""
        return self.rank_head(self.meter.features(self.meter.fuse(text_tokens, image_tokens, padding_mask)))[:, 0]

    def forward(self, image: Tensor, text_ids: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        m = self.meter
        return self.score(m.encode_text_tokens(text_ids, padding_mask), m.encode_image_tokens(image), padding_mask)


class METERForCaptioning(_Wrapper):
    """Captioning with the encoder-decoder architecture: the decoder's LM head, greedy :meth:`generate`."""

    def __init__(self, meter: METERModel | MeterConfig | str, **model_kwargs):
        super().__init__(meter, **model_kwargs)
        if not self.meter.encoder_decoder:
            raise ValueError(
                f"captioning needs architecture='encoder_decoder' (got {self.meter.config.architecture!r}); "
                "accepted values: 'encoder_decoder'"
            )

    def forward(self, image: Tensor, caption_ids: Tensor, caption_padding_mask: Tensor | None = None) -> Tensor:
        """Logits (B, L, V) of the next token at each caption position (input ``ids[:, :-1]`` style is the caller's)."""
        m = self.meter
        text = torch.tensor([[m.bos_id, m.eos_id]], device=image.device).expand(image.shape[0], -1)
        return m.decode(m.encode(image, text), caption_ids, caption_padding_mask)

    def generate(self, image: Tensor, max_len: int = 20) -> Tensor:
        return self.meter.generate(image, max_len)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
