"""Finetuning on a selected coreset: linear probes over frozen features (and, later, last-k-layer finetuning)."""

from skmm.finetune.linear_probe import LinearProbe, evaluate_predictions

__all__ = ["LinearProbe", "evaluate_predictions"]
