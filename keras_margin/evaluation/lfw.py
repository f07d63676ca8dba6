"""The LFW verification protocol end to end: pairs file + images folder + model -> embeddings -> cosine scores
-> 10-fold accuracy, ROC, AUC, EER, TAR@FAR and an optional ROC plot.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from keras_margin.evaluation.embeddings import compute_embeddings, cosine_scores
from keras_margin.evaluation.images import Preprocessing
from keras_margin.evaluation.metrics import DEFAULT_FARS, VerificationReport, verification_report
from keras_margin.evaluation.pairs import image_paths, read_pairs

if TYPE_CHECKING:  # pragma: no cover
    import keras

__all__ = ["PairsIndex", "evaluate_lfw", "index_pairs"]


@dataclass(frozen=True)
class PairsIndex:
    """A read pairs file against its images folder: each image once (``paths``), each pair's two rows in
    ``paths`` (``first``, ``second``), whether it is a same-person pair (``labels``) and its fold (``folds``)."""

    pairs: list
    paths: list
    first: np.ndarray
    second: np.ndarray
    labels: np.ndarray
    folds: np.ndarray


def index_pairs(pairs: str | os.PathLike, images: str | os.PathLike, ext: str = "jpg") -> PairsIndex:
    """Read and check ``pairs`` (LFW format) against ``images`` (PairsFileError naming file and line) and index it."""
    pairs_path, images = Path(pairs), Path(images)
    parsed = read_pairs(pairs_path, ext=ext)
    paths = image_paths(parsed, images, source=str(pairs_path))
    row = {path.relative_to(images).as_posix(): index for index, path in enumerate(paths)}
    return PairsIndex(parsed, paths, np.array([row[pair.first] for pair in parsed], dtype="int64"),
                      np.array([row[pair.second] for pair in parsed], dtype="int64"),
                      np.array([pair.same for pair in parsed]), np.array([pair.fold for pair in parsed]))


def evaluate_lfw(model: "keras.Model", pairs: str | os.PathLike, images: str | os.PathLike, *,
                 flip: bool | None = None, preprocessing: Preprocessing | None = None, ext: str = "jpg",
                 batch_size: int = 64, fars: Sequence[float] = DEFAULT_FARS, roc: str | os.PathLike | None = None,
                 progress: bool = True, ignore_contract: bool = False) -> VerificationReport:
    """Face-verification figures of ``model`` on an LFW-style pairs file.

    Each distinct image is embedded once (``compute_embeddings``: the embedding part of the model, i.e. the
    layers before a margin head; with the flip trick when ``flip``); a pair's score is the cosine of its two
    embeddings; ``verification_report`` turns the scores into the figures. The images are prepared per the
    model's ``InputContract`` completed by ``preprocessing`` and ``flip`` (``resolve_preprocessing``: a step the
    model does itself is never applied twice, an option contradicting the contract is a ``ValueError``).

    Args:
        model: a Keras model; a margin head and label inputs are dropped (``keras_margin.export.embedding_model``).
        pairs: the pairs file (``pairs.txt`` of View 2, a View 1 file, or a header-less list).
        images: the images folder: ``<images>/<name>/<name>_<4-digit number>.<ext>``.
        flip: feature of the image plus feature of its mirror, then L2 normalization; None: not given (no
            flip; never outside a model that flips itself). Defaults to None.
        preprocessing: size, channel order, mean and scale that turn the files into model input; None fields
            (all, for None) come from the model's ``InputContract``. Defaults to None.
        ext: image file extension. Defaults to "jpg".
        batch_size: images per model call. Defaults to 64.
        fars: FAR targets for TAR@FAR. Defaults to 1e-1 ... 1e-6.
        roc: write the ROC plot to this PNG (needs matplotlib). Defaults to None.
        progress: show a progress bar. Defaults to True.
        ignore_contract: use ``preprocessing`` and ``flip`` as given, whatever the model records. Defaults to
            False.

    Raises:
        PairsFileError: a malformed pairs file or a missing image, naming the file and line.
        ValueError: ``preprocessing`` contradicts the model's ``InputContract``.

    Example:
    >>> report = evaluate_lfw(model, "lfw/pairs.txt", "lfw-112x96")   # doctest: +SKIP
    >>> print(report.summary())                                        # doctest: +SKIP

    A model without a contract (or whose contract says ``pixels="unknown"``) needs the normalization given:
    >>> report = evaluate_lfw(model, "lfw/pairs.txt", "lfw-112x96", flip=True,   # doctest: +SKIP
    ...                       preprocessing=Preprocessing(channel_order="bgr", mean=128.0, scale=1 / 128))
    """
    from keras_margin.export.embedding import embedding_model

    if roc is not None:  # fail before the embeddings, not after
        from keras_margin.export._files import check_writable

        check_writable(roc)
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ImportError("plotting the ROC needs matplotlib, which is not installed: "
                              "pip install matplotlib") from None
    from keras_margin.evaluation.contract import PreprocessingWarning, resolve_preprocessing

    resolved = resolve_preprocessing(model, preprocessing, flip, ignore_contract=ignore_contract)
    for message in resolved.warnings:
        warnings.warn(f"evaluate_lfw: {message}", PreprocessingWarning, stacklevel=2)
    indexed = index_pairs(pairs, images, ext=ext)
    embeddings = compute_embeddings(embedding_model(model), indexed.paths, batch_size=batch_size,
                                    flip=resolved.flip, preprocessing=resolved.preprocessing, progress=progress,
                                    ignore_contract=True)
    scores = cosine_scores(embeddings[indexed.first], embeddings[indexed.second])
    report = verification_report(indexed.labels, scores, indexed.folds, fars)
    if roc is not None:
        from keras_margin.evaluation.plot import plot_roc

        plot_roc(report, roc)
    return report
