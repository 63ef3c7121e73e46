"""Downstream: fine-tuning, evaluation with the standard metrics, inference, caption generation, the quickstart."""

from ..model.generation import GenerationOutput, beam_search, generate, greedy_search
from ..model.heads import BEiT3ForTextClassification
from .finetune import FinetuneConfig, evaluate, finetune
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
from .task_specs import TASKS, TaskSpec, build_dataset, evaluate_model, task_loss

__all__ = [
    "TASKS",
    "BEiT3ForTextClassification",
    "FinetuneConfig",
    "GenerationOutput",
    "TaskSpec",
    "accuracy",
    "beam_search",
    "build_dataset",
    "caption_metrics",
    "captioning_loss",
    "classification_loss",
    "evaluate",
    "evaluate_model",
    "finetune",
    "generate",
    "greedy_search",
    "normalize_vqa_answer",
    "retrieval_recall",
    "soft_target_cross_entropy",
    "task_loss",
    "topk_accuracy",
    "vqa_accuracy",
    "vqa_loss",
    "vqa_score",
    "vqa_targets",
    "write_vqa_submission",
]
