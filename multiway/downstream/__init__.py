"""Downstream: the task registry, fine-tuning, evaluation with the standard metrics, inference, the quickstart."""

from ..model.generation import GenerationOutput, beam_search, generate, greedy_search
from ..model.heads import BEiT3ForTextClassification
from .evaluation import EvaluateConfig, OtherImages, evaluate
from .finetune import FinetuneConfig, finetune
from .losses import captioning_loss, classification_loss, soft_target_cross_entropy, vqa_loss
from .metrics import (
    accuracy,
    caption_metrics,
    normalize_vqa_answer,
    retrieval_recall,
    topk_accuracy,
    vqa_accuracy,
    vqa_score,
    vqa_targets,
    write_vqa_submission,
)
from .tasks import TASKS, DataSettings, DownstreamTask, EvalSettings, get_task

__all__ = [
    "TASKS",
    "BEiT3ForTextClassification",
    "DataSettings",
    "DownstreamTask",
    "EvalSettings",
    "EvaluateConfig",
    "FinetuneConfig",
    "GenerationOutput",
    "OtherImages",
    "accuracy",
    "beam_search",
    "caption_metrics",
    "captioning_loss",
    "classification_loss",
    "evaluate",
    "finetune",
    "generate",
    "get_task",
    "greedy_search",
    "normalize_vqa_answer",
    "retrieval_recall",
    "soft_target_cross_entropy",
    "topk_accuracy",
    "vqa_accuracy",
    "vqa_loss",
    "vqa_score",
    "vqa_targets",
    "write_vqa_submission",
]
