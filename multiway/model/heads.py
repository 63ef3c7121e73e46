"""Task heads on the Multiway Transformer, drop-in compatible with the official BEiT-3 classes.

Each class holds the backbone as ``self.beit3`` and its head modules under the official names, so official
checkpoints load unchanged, and ``forward`` takes the official keyword arguments and returns what the
official classes return. Cleaner entry points sit beside (``encode_image``, ``encode_text``, ``generate`` ...).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .config import MultiwayConfig
from .multiway import KVCache, MultiwayTransformer, image_to_text_mask, init_linear_and_norm
from .validation import check_image, check_mask, check_same_batch, check_token_ids, checking


class BEiT3Model(nn.Module):
    """Base class: a backbone under ``beit3`` plus the config that rebuilds it."""

    # Official fine-tuning excludes these from weight decay (plus every 1-D parameter and bias).
    no_weight_decay_names = ("beit3.encoder.embed_positions.A.weight", "beit3.vision_embed.cls_token", "logit_scale")

    def __init__(self, config: MultiwayConfig):
        super().__init__()
        self.config = config
        self.beit3 = MultiwayTransformer(config)

    @property
    def backbone(self) -> MultiwayTransformer:
        return self.beit3

    def head_config(self) -> dict:
        """Keyword arguments (beyond the config) needed to rebuild this model."""
        return {}

    def check_text(self, ids_name: str, ids: Tensor, mask_name: str = "padding_mask", mask: Tensor | None = None) -> None:
        """Token ids (B, T) within the vocabulary and their optional 0/1 mask of the same shape (see :mod:`.validation`)."""
        check_token_ids(ids_name, ids, self.config.vocab_size)
        if mask is not None:
            check_mask(mask_name, mask, tuple(ids.shape), f"{ids_name} (B, T)")

    def init_head(self, *modules: nn.Module) -> None:
        """Initialise head modules by ``config.head_init``: ``"official"`` (:func:`init_linear_and_norm`) or
        ``"fan_in"`` (PyTorch's default Linear init, std ~ (3 fan_in)^-1/2, LayerNorm (1, 0))."""
        for module in modules:
            if self.config.head_init == "official":
                init_linear_and_norm(module)
            else:
                for m in module.modules():
                    if isinstance(m, (nn.Linear, nn.LayerNorm)):
                        m.reset_parameters()


class BEiT3ForImageClassification(BEiT3Model):
    """Vision encoder + mean pooling over patch tokens (CLS excluded) + linear classifier.

    forward(image (B,C,H,W)) -> logits (B, num_classes). Built without the final encoder LayerNorm.
    """

    def __init__(self, config: MultiwayConfig, num_classes: int = 1000):
        super().__init__(config)
        dim = config.embed_dim
        self.num_classes = num_classes
        self.fc_norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_head(self.fc_norm, self.head)
        if isinstance(self.head, nn.Linear):
            self.head.weight.data.mul_(0.001)
            self.head.bias.data.mul_(0.001)

    def head_config(self) -> dict:
        return {"num_classes": self.num_classes}

    def forward_features(self, image: Tensor) -> Tensor:
        """(B, C, H, W) -> pooled (B, D)."""
        if checking():
            check_image("image", image, self.config)
        x = self.beit3.encode_image(image)
        return self.fc_norm(x[:, 1:].mean(1))

    def forward(self, image: Tensor, **kwargs) -> Tensor:
        return self.head(self.forward_features(image))


class Pooler(nn.Module):
    """``tanh(dense(norm(x[:, 0])))``."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.dense = nn.Linear(dim, dim)
        self.activation = nn.Tanh()

    def forward(self, x: Tensor) -> Tensor:
        return self.activation(self.dense(self.norm(x[:, 0])))


class BEiT3ForVisualQuestionAnswering(BEiT3Model):
    """Fusion encoder + pooler on the vision CLS token + 2-layer MLP over the answer vocabulary.

    forward(image (B,C,H,W), question (B,T), padding_mask (B,T)) -> logits (B, num_classes).
    Built without the final encoder LayerNorm.
    """

    def __init__(self, config: MultiwayConfig, num_classes: int = 3129):
        super().__init__(config)
        dim = config.embed_dim
        self.num_classes = num_classes
        self.pooler = Pooler(dim)
        self.head = nn.Sequential(nn.Linear(dim, dim * 2), nn.LayerNorm(dim * 2), nn.GELU(), nn.Linear(dim * 2, num_classes))
        self.init_head(self.pooler, self.head)

    def head_config(self) -> dict:
        return {"num_classes": self.num_classes}

    def forward(self, image: Tensor, question: Tensor, padding_mask: Tensor | None = None, **kwargs) -> Tensor:
        if checking():
            check_image("image", image, self.config)
            self.check_text("question", question, "padding_mask", padding_mask)
            check_same_batch({"image": image, "question": question})
        x = self.beit3(image, question, padding_mask).last_hidden_state
        return self.head(self.pooler(x))


class TwoLayerMLP(nn.Module):
    def __init__(self, in_features: int, hidden_features: int, out_features: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(in_features)
        self.dense1 = nn.Linear(in_features, hidden_features)
        self.norm2 = nn.LayerNorm(hidden_features)
        self.act = nn.GELU()
        self.dense2 = nn.Linear(hidden_features, out_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.dense2(self.act(self.norm2(self.dense1(self.norm1(x)))))


class BEiT3ForVisualReasoning(BEiT3Model):
    """NLVR2: two fused passes (one per image, batched together) -> [CLS_a, <s>_a, CLS_b, <s>_b] -> MLP.

    forward(image_a, image_b (B,C,H,W), text_description (B,T), padding_mask (B,T)) -> logits (B, num_classes).
    """

    def __init__(self, config: MultiwayConfig, num_classes: int = 2):
        super().__init__(config)
        dim = config.embed_dim
        self.num_classes = num_classes
        self.head = TwoLayerMLP(dim * 4, dim * 2, num_classes)
        self.init_head(self.head)
        if config.head_init == "official":
            # The official x0.001 on both layers. With the LayerNorm between them it starves the backbone of
            # gradient (~1e-6 of the usual); at small widths ("fan_in") the head is left at its fan-in init: a
            # tiny pretrained model then reached 68% instead of 60% on "the left image contains a red shape".
            for layer in (self.head.dense1, self.head.dense2):
                layer.weight.data.mul_(0.001)
                layer.bias.data.mul_(0.001)

    def head_config(self) -> dict:
        return {"num_classes": self.num_classes}

    def forward(
        self, image_a: Tensor, image_b: Tensor, text_description: Tensor, padding_mask: Tensor | None = None, **kwargs
    ) -> Tensor:
        if checking():
            check_image("image_a", image_a, self.config)
            check_image("image_b", image_b, self.config)
            self.check_text("text_description", text_description, "padding_mask", padding_mask)
            check_same_batch({"image_a": image_a, "image_b": image_b, "text_description": text_description})
        batch = text_description.shape[0]
        text = torch.cat([text_description, text_description])
        pad = None if padding_mask is None else torch.cat([padding_mask, padding_mask])
        out = self.beit3(torch.cat([image_a, image_b]), text, pad)
        x = out.last_hidden_state
        rep = torch.cat([x[:, 0], x[:, out.num_vision]], dim=-1)
        rep_a, rep_b = rep.split(batch)
        return self.head(torch.cat([rep_a, rep_b], dim=-1))


def gather_with_grad(x: Tensor) -> Tensor:
    """All-gather along the batch across ranks, keeping gradients (identity when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)


def contrastive_loss(image_feats: Tensor, text_feats: Tensor, logit_scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """CLIP loss over features gathered from all ranks (local rows vs. global columns).

    image_feats, text_feats: (B, D) normalised; logit_scale: scalar (already exponentiated).
    Returns (loss, logits_per_image (B, world*B), logits_per_text (B, world*B)).
    """
    all_images, all_texts = gather_with_grad(image_feats), gather_with_grad(text_feats)
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    logits_per_image = logit_scale * image_feats @ all_texts.t()
    logits_per_text = logit_scale * text_feats @ all_images.t()
    labels = torch.arange(image_feats.shape[0], device=image_feats.device) + rank * image_feats.shape[0]
    loss = (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
    return loss, logits_per_image, logits_per_text


class DualEncoderHeads:
    """Mixin for :class:`BEiT3Model` subclasses: the dual-encoder projections under their official names
    (``vision_head``, ``language_head``: bias-free D x D; ``logit_scale`` = log(1/0.07)) and the two encoders."""

    def _build_dual_encoder_heads(self) -> None:
        dim = self.config.embed_dim
        self.language_head = nn.Linear(dim, dim, bias=False)
        self.vision_head = nn.Linear(dim, dim, bias=False)
        self.init_head(self.language_head, self.vision_head)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_image(self, image: Tensor) -> Tensor:
        """(B, C, H, W) -> normalised (B, D): the projected vision [CLS] of an image-only pass."""
        if checking():
            check_image("image", image, self.config)
        return F.normalize(self.vision_head(self.beit3.encode_image(image)[:, 0]), dim=-1)

    def encode_text(self, text_ids: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """(B, T) -> normalised (B, D): the projected first token of a text-only pass."""
        if checking():
            self.check_text("text_ids", text_ids, "padding_mask", padding_mask)
        return F.normalize(self.language_head(self.beit3.encode_text(text_ids, padding_mask)[:, 0]), dim=-1)


class BEiT3ForRetrieval(DualEncoderHeads, BEiT3Model):
    """Dual encoder: separate image-only and text-only passes, projected and L2-normalised, CLIP loss.

    forward(image, text_description, padding_mask, only_infer=False) returns
    ``(vision_cls, language_cls)`` when ``only_infer`` else ``(loss, vision_cls, language_cls)``;
    embeddings are (B, D) unit vectors (None for a missing modality).
    """

    def __init__(self, config: MultiwayConfig):
        super().__init__(config)
        self._build_dual_encoder_heads()

    def forward(
        self,
        image: Tensor | None = None,
        text_description: Tensor | None = None,
        padding_mask: Tensor | None = None,
        only_infer: bool = False,
        **kwargs,
    ):
        if image is None and text_description is None:
            raise ValueError("pass image, text_description or both")
        if not only_infer and (image is None or text_description is None):
            raise ValueError("the contrastive loss needs both image and text_description (only_infer=True embeds one alone)")
        if checking():
            check_same_batch({"image": image, "text_description": text_description})
        vision_cls = self.encode_image(image) if image is not None else None
        language_cls = self.encode_text(text_description, padding_mask) if text_description is not None else None
        if only_infer:
            return vision_cls, language_cls
        loss, _, _ = contrastive_loss(vision_cls, language_cls, self.logit_scale.exp())
        return loss, vision_cls, language_cls


class BEiT3ForCaptioning(BEiT3Model):
    """Image-to-text: the fused backbone under the seq2seq mask, with an untied LM head.

    Training (UniLM-style masked LM): forward(image, text_ids (B,T), padding_mask (B,T),
    language_masked_pos (B,T)) -> (logits (M, vocab) at the masked positions, incremental_state).
    Incremental decoding follows the official protocol: pass ``incremental_state`` (a dict, as in the
    official beam search, or a :class:`KVCache`), with ``image`` for the first step and ``image=None`` plus
    ``text_len`` (real prefix length + 1) for later steps, which feed two tokens ``[last, <mask>]``.
    """

    def __init__(self, config: MultiwayConfig):
        super().__init__(config)
        self.mlm_head = nn.Linear(config.embed_dim, config.vocab_size)
        self.init_head(self.mlm_head)

    def forward(
        self,
        image: Tensor | None,
        text_ids: Tensor,
        padding_mask: Tensor | None = None,
        language_masked_pos: Tensor | None = None,
        text_len: int | None = None,
        incremental_state: dict | KVCache | None = None,
        **kwargs,
    ):
        if checking():
            self.check_text("text_ids", text_ids, "padding_mask", padding_mask)
            if image is not None:
                check_image("image", image, self.config)
                check_same_batch({"image": image, "text_ids": text_ids})
            elif incremental_state is None or text_len is None:
                raise ValueError("image=None is a decoding step: it needs incremental_state (the cache of the image) and text_len")
            if language_masked_pos is not None:
                check_mask("language_masked_pos", language_masked_pos, tuple(text_ids.shape), "text_ids (B, T)")
        text_len = text_ids.shape[1] if text_len is None else text_len
        num_vision = self.config.num_vision_tokens
        cache = incremental_state
        if isinstance(incremental_state, dict):
            cache = KVCache.from_incremental_state(incremental_state, self.beit3.num_layers)
        mask = image_to_text_mask(num_vision, text_len, device=text_ids.device)
        positions = None
        if image is None:  # a decoding step: the last rows of the mask, explicit text positions
            mask = mask[-text_ids.shape[1] :]
            padding_mask = None
            positions = torch.arange(text_len, text_len + text_ids.shape[1], device=text_ids.device).unsqueeze(0)
        out = self.beit3(image, text_ids, padding_mask, attn_mask=mask, text_positions=positions, kv_cache=cache)
        text_feats = out.last_hidden_state[:, out.num_vision :]
        if language_masked_pos is not None:
            text_feats = text_feats[language_masked_pos.bool()]
        if isinstance(incremental_state, dict):
            cache.to_incremental_state(incremental_state)
        return self.mlm_head(text_feats), incremental_state


class BEiT3ForTextClassification(BEiT3Model):
    """Language encoder + pooler on ``<s>`` + linear classifier (beyond the official release).

    forward(text_ids (B,T), padding_mask (B,T)) -> logits (B, num_classes). Only language experts run.
    """

    def __init__(self, config: MultiwayConfig, num_classes: int = 2):
        super().__init__(config)
        self.num_classes = num_classes
        self.pooler = Pooler(config.embed_dim)
        self.head = nn.Linear(config.embed_dim, num_classes)
        self.init_head(self.pooler, self.head)

    def head_config(self) -> dict:
        return {"num_classes": self.num_classes}

    def forward(self, text_ids: Tensor, padding_mask: Tensor | None = None, **kwargs) -> Tensor:
        if checking():
            self.check_text("text_ids", text_ids, "padding_mask", padding_mask)
        return self.head(self.pooler(self.beit3.encode_text(text_ids, padding_mask)))


class BEiT3ForPretraining(DualEncoderHeads, BEiT3Model):
    """Masked data modeling: one backbone, a text head over the vocabulary and an image head over visual tokens.

    forward(image, text_ids, padding_mask, image_masked_positions, text_masked_positions) returns
    ``(text_logits (M_t, vocab) | None, image_logits (M_i, codebook) | None)`` at the masked positions.

    ``contrastive=True`` adds the dual-encoder heads of :class:`BEiT3ForRetrieval` (same names, so a retrieval
    fine-tune starts from them, as the official ``*_itc`` checkpoints do) for an image-text contrastive loss
    beside masked data modeling: ``forward(image, text_ids, padding_mask, contrastive=True)`` encodes the image
    alone and the text alone and returns ``(loss, image_feats (B, D), text_feats (B, D))`` as the retrieval
    model does (through ``forward``, so DDP/FSDP wrappers see the call).
    """

    def __init__(self, config: MultiwayConfig, codebook_size: int = 8192, contrastive: bool = False):
        super().__init__(config)
        self.codebook_size = codebook_size
        self.contrastive = contrastive
        self.mlm_head = nn.Linear(config.embed_dim, config.vocab_size)
        self.mim_head = nn.Linear(config.embed_dim, codebook_size)
        self.init_head(self.mlm_head, self.mim_head)
        if contrastive:
            self._build_dual_encoder_heads()

    def head_config(self) -> dict:
        return {"codebook_size": self.codebook_size, **({"contrastive": True} if self.contrastive else {})}

    def forward(
        self,
        image: Tensor | None = None,
        text_ids: Tensor | None = None,
        padding_mask: Tensor | None = None,
        image_masked_positions: Tensor | None = None,
        text_masked_positions: Tensor | None = None,
        contrastive: bool = False,
    ) -> tuple[Tensor | None, ...]:
        if contrastive:
            if not self.contrastive:
                raise ValueError("contrastive=True needs a model built with contrastive=True (dual-encoder heads)")
            if image is None or text_ids is None:
                raise ValueError("the image-text contrastive loss needs both image and text_ids")
            image_feats, text_feats = self.encode_image(image), self.encode_text(text_ids, padding_mask)
            loss, _, _ = contrastive_loss(image_feats.float(), text_feats.float(), self.logit_scale.exp().float())
            return loss, image_feats, text_feats
        if checking() and text_ids is not None:
            self.check_text("text_ids", text_ids, "padding_mask", padding_mask)
            if text_masked_positions is not None:
                check_mask("text_masked_positions", text_masked_positions, tuple(text_ids.shape), "text_ids (B, T)")
        out = self.beit3(image, text_ids, padding_mask, image_masked_positions=image_masked_positions)
        x, nv = out.last_hidden_state, out.num_vision
        text_logits = image_logits = None
        if text_ids is not None and text_masked_positions is not None:
            text_logits = self.mlm_head(x[:, nv:][text_masked_positions.bool()])
        if image is not None and image_masked_positions is not None:
            image_logits = self.mim_head(x[:, 1:nv][image_masked_positions.bool()])
        return text_logits, image_logits


TASK_HEADS: dict[str, tuple[type[BEiT3Model], dict]] = {
    # task suffix -> (class, config overrides the official registry applies)
    "imageclassification": (BEiT3ForImageClassification, {"normalize_output": False}),
    "vqav2": (BEiT3ForVisualQuestionAnswering, {"normalize_output": False}),
    "nlvr2": (BEiT3ForVisualReasoning, {}),
    "retrieval": (BEiT3ForRetrieval, {}),
    "captioning": (BEiT3ForCaptioning, {}),
    "textclassification": (BEiT3ForTextClassification, {}),
    "pretraining": (BEiT3ForPretraining, {}),
}
# detection, semantic segmentation, token classification (multiway.dense.models)
from ..dense.models import DENSE_HEADS  # noqa: E402

TASK_HEADS.update(DENSE_HEADS)


def model_name_of(model: nn.Module) -> str:
    """The task suffix a model was built for (a key of :data:`TASK_HEADS`; '' for a bare backbone)."""
    for task, (cls, _) in TASK_HEADS.items():
        if type(model) is cls:
            return task
    return ""
