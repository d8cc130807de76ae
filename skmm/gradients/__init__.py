"""Stage 1 of SkMM: the gradients whose sketch the selection works on (SKMM.md §2).

Linear probing (LP): L2-normalised frozen features, or a linear head's cross-entropy gradient as the two
factors (p − y, φ) for a Kronecker sketch. Finetuning (FT): per-sample gradients of the last layers with
uniformly random pseudo-labels (a pure function of (seed, sample key)), projected batch by batch with one
seeded projector so that the N×r gradient matrix is never formed.
"""

from skmm.gradients.features import linear_head_gradient_factors, normalize_features, pseudo_labels
from skmm.gradients.finetune import (
    gradient_dim,
    iter_sketch_gradients,
    last_k_parameter_names,
    per_sample_gradients,
    sketch_gradients,
)

__all__ = [
    "gradient_dim",
    "iter_sketch_gradients",
    "last_k_parameter_names",
    "linear_head_gradient_factors",
    "normalize_features",
    "per_sample_gradients",
    "pseudo_labels",
    "sketch_gradients",
]
