"""Tokenizers: SentencePiece text (XLM-R ids) and the VQ-KD visual tokenizer."""

from .text import TextTokenizer, train_text_tokenizer
from .visual import (
    VQKD,
    VQKD_PRESETS,
    NormEMAVectorQuantizer,
    PixelTeacher,
    VQKDConfig,
    build_teacher,
    load_vqkd,
    probe_visual_tokenizer,
    save_vqkd,
    train_visual_tokenizer,
    vqkd_config,
)

__all__ = [
    "VQKD", "VQKD_PRESETS", "NormEMAVectorQuantizer", "PixelTeacher", "TextTokenizer", "VQKDConfig", "build_teacher",
    "load_vqkd", "probe_visual_tokenizer", "save_vqkd", "train_text_tokenizer", "train_visual_tokenizer",
    "vqkd_config",
]
