"""Data: the index-dataset base and collation, file I/O, raw-file index builders, pretraining streams, masking,
transforms and the built-in shapes data."""

from .index_dataset import IndexDataset, collate_batch, encode_text
from .io import DataError, DataErrors, index_files, load_image, read_jsonl, write_jsonl
from .masking import IGNORE_INDEX, BlockMaskingGenerator, mask_captioning, mask_text
from .raw_indexes import (
    build_coco_captioning_index,
    build_imagenet_index,
    build_karpathy_retrieval_index,
    build_nlvr2_index,
    build_nocaps_index,
    build_vqa_index,
    build_vqav2_index,
    read_answer2label,
)
from .shapes import HELD_OUT, generate_synthetic_dataset
from .streams import ImageStream, PairStream, TextStream, expand_source, reader_info
from .transforms import PretrainTransform, build_imagenet_transform, build_transform

__all__ = [
    "DataError", "DataErrors", "HELD_OUT", "IGNORE_INDEX", "BlockMaskingGenerator",
    "ImageStream", "IndexDataset", "PairStream", "PretrainTransform",
    "TextStream", "build_coco_captioning_index", "build_imagenet_index",
    "build_imagenet_transform", "build_karpathy_retrieval_index", "build_nlvr2_index", "build_nocaps_index",
    "build_transform", "build_vqa_index", "build_vqav2_index", "collate_batch", "encode_text", "expand_source",
    "generate_synthetic_dataset", "index_files", "load_image", "mask_captioning", "mask_text", "read_answer2label",
    "read_jsonl", "reader_info", "write_jsonl",
]
