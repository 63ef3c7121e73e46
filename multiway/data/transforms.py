"""Image transforms per task (§3), with torchvision.transforms.v2 (and timm for the ImageNet recipe).

All transforms take a PIL image and return a float tensor (3, S, S).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torchvision.transforms import v2

from multiway.constants import IMAGENET_MEAN, IMAGENET_STD, VL_MEAN, VL_STD

BICUBIC = v2.InterpolationMode.BICUBIC

VL_TASKS = ("nlvr2", "vqav2", "coco_retrieval", "flickr30k", "coco_captioning", "nocaps")


def _randaugment() -> v2.Transform:
    """Stand-in for the official cv2 ``RandomAugment(N=2, M=7)``: two ops among identity, autocontrast,
    equalize, brightness, sharpness, shear, translate and rotate at magnitude 7/10, each applied with p=0.5."""
    ops = [
        v2.Identity(), v2.RandomAutocontrast(p=1.0), v2.RandomEqualize(p=1.0),
        v2.ColorJitter(brightness=0.63), v2.RandomAdjustSharpness(sharpness_factor=1.9, p=1.0),
        v2.RandomAffine(degrees=0, shear=(-21, 21, 0, 0)), v2.RandomAffine(degrees=0, shear=(0, 0, -21, 21)),
        v2.RandomAffine(degrees=0, translate=(0.3, 0.3)), v2.RandomRotation(21),
    ]
    return v2.Compose([v2.RandomApply([v2.RandomChoice(ops)], p=0.5) for _ in range(2)])


def build_transform(task: str, is_train: bool, img_size: int = 224, randaug: bool = False,
                    crop_pct: float = 1.0, crop_scale: tuple[float, float] = (0.5, 1.0), hflip: bool = True,
                    mean: Sequence[float] = VL_MEAN, std: Sequence[float] = VL_STD) -> Callable:
    """Official BEiT-3 transform of ``task`` (PIL -> (3, S, S) float tensor).

    Vision-language tasks (mean = std = 0.5): train = RandomResizedCrop(scale=``crop_scale``, bicubic) + horizontal
    flip (even for VQA/NLVR2, as the official code; ``hflip=False`` drops it, e.g. for captions that say left or
    right) + optional RandAugment; eval = Resize((S, S), bicubic). ``mean``/``std``: the normalisation.
    ``imagenet``: see :func:`build_imagenet_transform`.
    """
    if task == "imagenet":
        return build_imagenet_transform(is_train, img_size, crop_pct)
    if task not in VL_TASKS and task:
        raise ValueError(f"unknown task {task!r}; known: imagenet, {', '.join(VL_TASKS)}")
    if is_train:
        ops = [v2.ToImage(), v2.RandomResizedCrop(img_size, scale=tuple(crop_scale), interpolation=BICUBIC, antialias=True)]
        if hflip:
            ops.append(v2.RandomHorizontalFlip())
        if randaug:
            ops.append(_randaugment())
    else:
        ops = [v2.ToImage(), v2.Resize((img_size, img_size), interpolation=BICUBIC, antialias=True)]
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return v2.Compose(ops)


def build_imagenet_transform(is_train: bool, img_size: int = 224, crop_pct: float = 1.0) -> Callable:
    """ImageNet recipe: train = timm ``create_transform(color_jitter=0.4, auto_augment='rand-m9-mstd0.5-inc1',
    bicubic, re_prob=0.25, re_mode='pixel', re_count=1)``; eval = Resize(int(S/crop_pct), bicubic) +
    CenterCrop(S). ImageNet mean/std."""
    if is_train:
        from timm.data import create_transform

        tf = create_transform(input_size=img_size, is_training=True, color_jitter=0.4,
                              auto_augment="rand-m9-mstd0.5-inc1", interpolation="bicubic", re_prob=0.25,
                              re_mode="pixel", re_count=1, mean=IMAGENET_MEAN, std=IMAGENET_STD)
        _patch_posterize(tf)
        return tf
    return v2.Compose([
        v2.ToImage(), v2.Resize(int(img_size / crop_pct), interpolation=BICUBIC, antialias=True),
        v2.CenterCrop(img_size), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def _safe_posterize(img, bits_to_keep: int, **_):
    """Posterize as older Pillow did: 0 bits kept gives black. With ``mstd0.5`` timm's increasing posterize can
    draw 0 bits, which Pillow >= 10 rejects with a ValueError inside a dataloader worker."""
    from PIL import Image, ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _patch_posterize(transform) -> None:
    for t in getattr(transform, "transforms", []):
        for op in getattr(t, "ops", []):
            if getattr(op, "name", "").startswith("Posterize"):
                op.aug_fn = _safe_posterize


class PretrainTransform:
    """Pretraining view(s) of one image: the same random resized crop + flip + colour jitter feeds the model
    (normalised with mean = std = 0.5) and, optionally, the visual tokenizer (in [0, 1], at its own size), so
    the visual tokens line up with the model's patches.

    Returns ``image`` (3, S, S) or, with ``tokenizer_size``, ``(image, tokenizer_image)``.
    """

    def __init__(self, img_size: int = 224, tokenizer_size: int | None = None, scale: tuple[float, float] = (0.2, 1.0),
                 color_jitter: float = 0.4, hflip: bool = True) -> None:
        ops = [v2.ToImage(), v2.RandomResizedCrop(img_size, scale=scale, interpolation=BICUBIC, antialias=True)]
        if hflip:
            ops.append(v2.RandomHorizontalFlip())
        if color_jitter:
            ops.append(v2.ColorJitter(color_jitter, color_jitter, color_jitter))
        self.common = v2.Compose(ops + [v2.ToDtype(torch.float32, scale=True)])
        self.img_size, self.tokenizer_size = img_size, tokenizer_size
        self.normalize = v2.Normalize(VL_MEAN, VL_STD)

    def __call__(self, img) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        x = self.common(img).clamp_(0, 1)
        image = self.normalize(x)
        if self.tokenizer_size is None:
            return image
        tok = x if self.tokenizer_size == self.img_size else torch.nn.functional.interpolate(
            x[None], size=(self.tokenizer_size, self.tokenizer_size), mode="bicubic", align_corners=False,
            antialias=True)[0].clamp_(0, 1)
        return image, tok
