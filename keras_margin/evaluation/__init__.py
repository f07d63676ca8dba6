"""Face-verification evaluation: LFW pairs files, image loading, embeddings (with the flip trick), ROC / AUC /
EER / TAR@FAR / 10-fold accuracy and the ROC plot. No module here imports TensorFlow or Keras until it is used.

Example:
>>> from keras_margin.evaluation import Preprocessing, evaluate_lfw                 # doctest: +SKIP
>>> report = evaluate_lfw(model, "pairs.txt", "lfw-112x96", roc="roc.png")               # doctest: +SKIP
>>> print(report.summary())                                                          # doctest: +SKIP
"""

from keras_margin.evaluation.contract import PreprocessingWarning, Resolved, resolve_preprocessing
from keras_margin.evaluation.embeddings import compute_embeddings, cosine_scores, l2_normalize
from keras_margin.evaluation.images import Preprocessing, load_image, load_images
from keras_margin.evaluation.lfw import evaluate_lfw
from keras_margin.evaluation.metrics import (
    DEFAULT_FARS,
    VerificationReport,
    auc,
    best_threshold,
    equal_error_rate,
    kfold_accuracy,
    roc_auc,
    roc_curve,
    tar_at_far,
    verification_report,
)
from keras_margin.evaluation.pairs import Pair, PairsFileError, image_paths, parse_pairs, read_pairs
from keras_margin.evaluation.plot import plot_roc

__all__ = [
    "DEFAULT_FARS",
    "Pair",
    "PairsFileError",
    "Preprocessing",
    "PreprocessingWarning",
    "Resolved",
    "VerificationReport",
    "auc",
    "best_threshold",
    "compute_embeddings",
    "cosine_scores",
    "equal_error_rate",
    "evaluate_lfw",
    "image_paths",
    "kfold_accuracy",
    "l2_normalize",
    "load_image",
    "load_images",
    "parse_pairs",
    "plot_roc",
    "read_pairs",
    "resolve_preprocessing",
    "roc_auc",
    "roc_curve",
    "tar_at_far",
    "verification_report",
]
