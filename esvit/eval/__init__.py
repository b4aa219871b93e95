"""Evaluation of pretrained backbones: weighted k-NN and linear probe on frozen features, with the paper's
eval transforms, rank-sharded feature extraction and a random-initialisation baseline."""

from .features import extract_features, gather_in_order, linear_features, view_features
from .knn import format_knn_table, knn_classify
from .linear import train_linear_probe
from .model import EvalModel, load_eval_model, token_grid
from .transforms import eval_transform

__all__ = [
    "EvalModel",
    "eval_transform",
    "extract_features",
    "format_knn_table",
    "gather_in_order",
    "knn_classify",
    "linear_features",
    "load_eval_model",
    "token_grid",
    "train_linear_probe",
    "view_features",
]
