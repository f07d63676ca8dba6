"""The LFW verification protocol end to end: pairs file + images folder + model -> embeddings -> cosine scores
-> 10-fold accuracy, ROC, AUC, EER, TAR@FAR and an optional ROC plot.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from keras_margin.evaluation.embeddings import compute_embeddings, cosine_scores
from keras_margin.evaluation.images import Preprocessing
from keras_margin.evaluation.metrics import DEFAULT_FARS, VerificationReport, verification_report
from keras_margin.evaluation.pairs import image_paths, read_pairs

if TYPE_CHECKING:  # pragma: no cover
    import keras

__all__ = ["evaluate_lfw"]


def evaluate_lfw(model: "keras.Model", pairs: str | os.PathLike, images: str | os.PathLike, *,
                 flip: bool = False, preprocessing: Preprocessing = Preprocessing(), ext: str = "jpg",
                 batch_size: int = 64, fars: Sequence[float] = DEFAULT_FARS, roc: str | os.PathLike | None = None,
                 progress: bool = True) -> VerificationReport:
    """Face-verification figures of ``model`` on an LFW-style pairs file.

    Each distinct image is embedded once (``compute_embeddings``: the embedding part of the model, i.e. the
    layers before a margin head; with the flip trick when ``flip``); a pair's score is the cosine of its two
    embeddings; ``verification_report`` turns the scores into the figures.

    Args:
        model: a Keras model; a margin head and label inputs are dropped (``keras_margin.export.embedding_model``).
        pairs: the pairs file (``pairs.txt`` of View 2, a View 1 file, or a header-less list).
        images: the images folder: ``<images>/<name>/<name>_<4-digit number>.<ext>``.
        flip: feature of the image plus feature of its mirror, then L2 normalization (default False).
        preprocessing: size, channel order, mean and scale that turn the files into model input.
        ext: image file extension (default "jpg").
        batch_size: images per model call (default 64).
        fars: FAR targets for TAR@FAR (default 1e-1 ... 1e-6).
        roc: write the ROC plot to this PNG (needs matplotlib).
        progress: show a progress bar (default True).

    Raises:
        PairsFileError: a malformed pairs file or a missing image, naming the file and line.

    Example:
    >>> report = evaluate_lfw(model, "lfw/pairs.txt", "lfw-112x96", flip=True,   # doctest: +SKIP
    ...                       preprocessing=Preprocessing(channel_order="bgr", mean=128.0, scale=1 / 128))
    >>> print(report.summary())                                                    # doctest: +SKIP
    """
    from keras_margin.export.embedding import embedding_model

    if roc is not None:  # fail before the embeddings, not after
        if not Path(roc).parent.is_dir():
            raise FileNotFoundError(f"{roc}: the folder {Path(roc).parent} does not exist")
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ImportError("plotting the ROC needs matplotlib, which is not installed: pip install matplotlib") from None
    pairs_path = Path(pairs)
    parsed = read_pairs(pairs_path, ext=ext)
    paths = image_paths(parsed, images, source=str(pairs_path))
    index = {path.relative_to(Path(images)).as_posix(): row for row, path in enumerate(paths)}
    embeddings = compute_embeddings(embedding_model(model), paths, batch_size=batch_size, flip=flip,
                                    preprocessing=preprocessing, progress=progress)
    first = embeddings[[index[pair.first] for pair in parsed]]
    second = embeddings[[index[pair.second] for pair in parsed]]
    scores = cosine_scores(first, second)
    labels = np.array([pair.same for pair in parsed])
    folds = np.array([pair.fold for pair in parsed])
    report = verification_report(labels, scores, folds, fars)
    if roc is not None:
        from keras_margin.evaluation.plot import plot_roc

        plot_roc(report, roc)
    return report
