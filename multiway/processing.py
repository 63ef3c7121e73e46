"""One load call: ``model, processor = multiway.load(path_or_name)``.

The :class:`Processor` turns images (file paths, folders, PIL images, (3, H, W) tensors) and strings into the
model's inputs with the model's own tokenizer and preprocessing, and the model's outputs back into answers,
captions, labels and embeddings through the model's task (:meth:`DownstreamTask.predict`). What it needs comes
from the model file (:func:`multiway.save_pretrained` embeds the tokenizer, the preprocessing and the task) or a
``multiway finetune`` run folder; explicit arguments override it.

>>> model, processor = multiway.load("runs/captioning/model.safetensors")
>>> processor.predict(images=["photos/"]).rows            # [{"path": "photos/a.jpg", "caption": "..."}]
>>> batch = processor(images=[pil_image], text=["a red square"])   # {"image", "language_tokens", "padding_mask"}
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .downstream.inference import Predictor, Result, list_images, load_predictor, read_images


class Processor:
    """Inputs to tensors and outputs to answers for one model (built by :func:`load`).

    Attributes: ``tokenizer`` (a :class:`~multiway.tokenizers.TextTokenizer` or None), ``transform`` (image ->
    (3, S, S) float tensor), ``labels`` (class names / answers by id, or None), ``task`` (the
    :class:`~multiway.downstream.tasks.DownstreamTask`), ``max_text_len`` (T, specials included).
    """

    def __init__(self, predictor: Predictor) -> None:
        self.predictor = predictor

    @property
    def tokenizer(self) -> Any:
        return self.predictor.tokenizer

    @property
    def transform(self) -> Any:
        return self.predictor.transform

    @property
    def labels(self) -> list[str] | None:
        return self.predictor.labels

    @property
    def task(self) -> Any:
        return self.predictor.downstream

    @property
    def max_text_len(self) -> int:
        return self.predictor.max_text_len

    def images(self, images: Any) -> Tensor:
        """Images (one or a list of paths, folders, PIL images, (3, H, W) uint8 or [0, 1] float tensors) ->
        (B, 3, S, S) float tensor on the model's device. A file that cannot be read raises, naming it."""
        tensors, _, errors = read_images(list_images(images), self.transform)
        if errors:
            raise ValueError(f"images: {len(errors)} could not be read: {'; '.join(errors[:3])}")
        if not tensors:
            raise ValueError("images: no image given (an empty list, or folders without image files)")
        return torch.stack(tensors).to(self.predictor.device)

    def text(self, text: str | Sequence[str]) -> dict[str, Tensor]:
        """A string or a list of strings -> ``{"language_tokens": (B, T) long, "padding_mask": (B, T)}`` on the
        model's device (``max_text_len`` tokens with ``<s>``/``</s>``, padded)."""
        if self.tokenizer is None:
            raise ValueError("this model file carries no text tokenizer: load it with tokenizer=<SentencePiece .model/.spm>")
        texts = [text] if isinstance(text, str) else list(text)
        enc = self.tokenizer(texts, max_len=self.max_text_len)
        return {k: enc[k].to(self.predictor.device) for k in ("language_tokens", "padding_mask")}

    def __call__(self, images: Any = None, text: str | Sequence[str] | None = None) -> dict[str, Tensor]:
        """Model inputs: ``{"image": (B, 3, S, S)}`` and/or ``{"language_tokens", "padding_mask"}`` (see
        :meth:`images`, :meth:`text`)."""
        if images is None and text is None:
            raise TypeError("processor(): give images=, text= or both")
        out: dict[str, Tensor] = {}
        if images is not None:
            out["image"] = self.images(images)
        if text is not None:
            out.update(self.text(text))
        return out

    def decode(self, token_ids: Tensor | Sequence[Sequence[int]]) -> list[str]:
        """(B, L) token ids (e.g. ``multiway.model.generation.generate(...).sequences``) -> B strings."""
        if self.tokenizer is None:
            raise ValueError("this model file carries no text tokenizer: load it with tokenizer=<SentencePiece .model/.spm>")
        return self.tokenizer.batch_decode(token_ids)

    def generation_kwargs(self) -> dict[str, int]:
        """``mask_id`` and ``vocab_limit`` of the tokenizer, for :func:`multiway.model.generation.generate`
        (decoding never emits ids the tokenizer cannot decode)."""
        if self.tokenizer is None:
            raise ValueError("this model file carries no text tokenizer: load it with tokenizer=<SentencePiece .model/.spm>")
        return {"mask_id": self.tokenizer.mask_id, "vocab_limit": self.tokenizer.vocab_size}

    def predict(self, images: Any = None, text: str | Sequence[str] | None = None, **options: Any) -> Result:
        """The task's answer for the inputs, as a :class:`~multiway.downstream.inference.Result` (``rows``: one dict
        per input; ``errors``: unreadable files by name; ``output``: embeddings or scores where there are some).

        captioning: ``images`` -> ``{"path", "caption"}``; vqav2: ``images`` + ``text`` (the question) ->
        ``{"path", "question", "answer", "top"}``; nlvr2: ``images=[a, b]`` + ``text`` -> ``{"true", "prob_true"}``;
        retrieval: ``images`` and/or ``text`` -> embeddings (``output``), both -> ranked hits; imagenet: ``images``
        -> ``{"path", "label", "top"}``; text classification: ``text`` -> ``{"text", "label", "top"}``.
        """
        return self.task.predict(self.predictor, images=images, text=text, **options)

    def __repr__(self) -> str:
        tok = f"{self.tokenizer.vocab_size} ids" if self.tokenizer is not None else None
        return (f"Processor(task={self.task.name!r}, img_size={self.predictor.img_size}, max_text_len={self.max_text_len}, "
                f"tokenizer={tok}, labels={len(self.labels) if self.labels else None})")


def load(
    path_or_name: str | os.PathLike | nn.Module,
    task: str | None = None,
    tokenizer: str | os.PathLike | None = None,
    labels: str | os.PathLike | Sequence[str] | None = None,
    model_name: str | None = None,
    device: str | torch.device | None = None,
) -> tuple[nn.Module, Processor]:
    """A model in eval mode and its :class:`Processor`, from one name.

    Args:
        path_or_name: a ``.safetensors`` model file (what it embeds is used: tokenizer, preprocessing, task), a
            ``multiway finetune`` output folder, an official ``.pth`` (with ``model_name``), a registered model
            name (``beit3_tiny_patch8_32_captioning``: a fresh, untrained model) or a module.
        task: the downstream task (an official name, e.g. ``"flickr30k"``); default: the one the file names, or the
            first task of the model's head.
        tokenizer: a SentencePiece model overriding the embedded one (needed for text with a file that has none).
        labels: class names / answers overriding the embedded ones (``answer2label.txt`` or one name per line).
        model_name: the model an official ``.pth`` holds (``beit3_base_patch16_480_vqav2``); without it the error
            lists the presets whose shapes fit the file.
        device: default CUDA when available, else CPU.

    Returns:
        ``(model, processor)``.
    """
    import multiway

    from .downstream.tasks import get_task

    source: Any = path_or_name
    if isinstance(path_or_name, str) and not os.path.exists(path_or_name):
        try:
            source = multiway.create_model(path_or_name)
        except KeyError as e:
            raise FileNotFoundError(f"{path_or_name!r} is neither a file or folder nor a model name ({e.args[0]})") from None
    predictor = load_predictor(source, tokenizer=tokenizer, labels=labels, device=device, model_name=model_name)
    if task is not None:
        task_cls = get_task(task)
        if task_cls.head != predictor.task:
            raise ValueError(f"task={task!r} needs a {task_cls.head} model, but {path_or_name} holds a {predictor.task} model")
        options = predictor.downstream.options if type(predictor.downstream) is task_cls else None
        predictor.downstream = task_cls(options)
    return predictor.model, Processor(predictor)


__all__ = ["Processor", "load"]
