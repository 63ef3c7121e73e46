"""Tokenizers: SentencePiece text (XLM-R ids) and the VQ-KD visual tokenizer."""

from .teachers import FeatureTeacher, PixelTeacher, build_teacher
from .text import TextTokenizer, train_text_tokenizer
from .vqkd import VQKD, VQKD_PRESETS, NormEMAVectorQuantizer, VQKDConfig, load_vqkd, save_vqkd, vqkd_config
from .vqkd_training import VQKDTask, VQKDTrainConfig, probe_visual_tokenizer, train_visual_tokenizer, train_vqkd

__all__ = [
    "VQKD", "VQKD_PRESETS", "FeatureTeacher", "NormEMAVectorQuantizer", "PixelTeacher", "TextTokenizer", "VQKDConfig",
    "VQKDTask", "VQKDTrainConfig", "build_teacher", "load_vqkd", "probe_visual_tokenizer", "save_vqkd",
    "train_text_tokenizer", "train_visual_tokenizer", "train_vqkd", "vqkd_config",
]
