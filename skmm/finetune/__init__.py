"""Finetuning on a selected coreset: linear probes over frozen features, and the last k layers of a CLIP tower."""

from skmm.finetune.last_layers import LastLayersFinetuner, model_format
from skmm.finetune.linear_probe import LinearProbe, evaluate_predictions

__all__ = ["LastLayersFinetuner", "LinearProbe", "evaluate_predictions", "model_format"]
