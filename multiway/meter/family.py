"""What METER's tasks share on the downstream task interface: how their models are built from a METER preset,
saved, loaded and initialised (the ``family`` hooks of :class:`~multiway.downstream.tasks.DownstreamTask`), so
``multiway finetune`` / ``evaluate`` / ``predict`` run METER models through the same code as BEiT-3's."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from .config import get_meter_config
from .model import METERModel


class METERFamily:
    """Mixin of METER's task classes (before the BEiT-3 task they reuse): models from ``multiway.meter.PRESETS``,
    files of :func:`~multiway.meter.checkpoints.save_meter`, inits from METER releases or METER files."""

    family: ClassVar[str] = "meter"

    def model_source(self, preset: str, overrides: Mapping[str, Any], tokenizer: Any = None, max_text_len: int = 64) -> METERModel:
        """A fresh METER of ``preset`` whose text side fits ``tokenizer`` (vocabulary size, pad/bos/eos ids) and
        ``max_text_len`` tokens. ``overrides`` (BEiT-3 config fields) do not apply to METER and are refused."""
        if overrides:
            raise ValueError(f"model.{next(iter(overrides))}: METER preset {preset!r} takes no BEiT-3 config overrides "
                             f"(given: {', '.join(overrides)}); set METER's fields in a MeterConfig instead")
        cfg = get_meter_config(preset)
        ids: dict[str, int] = {}
        if tokenizer is not None:
            from .objectives import TextSpec

            spec = TextSpec.from_tokenizer(tokenizer)
            cfg.text.vocab_size = spec.vocab_size
            ids = dict(pad_id=spec.pad_id, bos_id=spec.bos_id, eos_id=spec.eos_id)
        cfg.text.max_len = max(cfg.text.max_len, max_text_len)
        return METERModel(cfg, **ids)

    def model_img_size(self, preset: str, overrides: Mapping[str, Any]) -> int:
        return get_meter_config(preset).vision.img_size

    @classmethod
    def model_limits(cls, model: nn.Module) -> tuple[int, int]:
        return model.config.vision.img_size, model.config.text.max_len

    def save_model(self, model: nn.Module, path: str | Path, tokenizer: Any = None, preprocessing: Mapping[str, Any] | None = None,
                   task: Mapping[str, Any] | None = None) -> Path:
        from .checkpoints import save_meter

        return save_meter(model, path, tokenizer=tokenizer, preprocessing=preprocessing, task=task)

    @classmethod
    def load_model(cls, path: str | Path) -> nn.Module:
        from .checkpoints import load_meter

        return load_meter(path)

    def load_init(self, model: nn.Module, path: str) -> Any:
        """A METER release (``.ckpt``, through METER's key layout) or a multiway METER file (its ``meter.*`` weights;
        the head starts fresh unless it fits)."""
        from ..downstream.tasks import model_file_family
        from .checkpoints import load_official_checkpoint

        if model_file_family(path) != "meter":
            return load_official_checkpoint(model, path)
        from ..model.checkpoints import LoadReport, raise_unfit
        from .checkpoints import load_meter

        loaded = load_meter(path)
        same_head = type(loaded) is type(model)  # another task's head never seeds this one, even where shapes agree
        source = loaded.state_dict()
        expected = model.state_dict()
        fits = {k: v for k, v in source.items() if k in expected and v.shape == expected[k].shape and (same_head or k.startswith("meter."))}
        missing = [k for k in expected if k.startswith("meter.") and k not in fits]
        if missing:
            raise_unfit(path, model, missing, [], [], "initialise from a METER file of the same preset and tokenizer")
        model.load_state_dict(fits, strict=False)
        return LoadReport(loaded=sorted(fits), missing=[k for k in expected if k not in fits])


__all__ = ["METERFamily"]
