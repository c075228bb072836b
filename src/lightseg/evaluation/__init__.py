"""Evaluation: Dice, IoU, HD95 and surface Dice of predicted label maps, into summary.json."""

from lightseg.evaluation.report import evaluate, format_table
from lightseg.evaluation.metrics import Target, case_metrics, targets_from_spec, targets_from_values

__all__ = ["Target", "case_metrics", "evaluate", "format_table", "targets_from_spec", "targets_from_values"]
