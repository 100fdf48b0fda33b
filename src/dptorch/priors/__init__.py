"""Data-independent priors: weights learned from synthetic images, at no privacy cost."""

from dptorch.priors.contrastive import PretrainReport, nt_xent_loss, pretrain_on_dead_leaves
from dptorch.priors.synthetic import dead_leaves, random_views

__all__ = [
    "PretrainReport",
    "dead_leaves",
    "nt_xent_loss",
    "pretrain_on_dead_leaves",
    "random_views",
]
