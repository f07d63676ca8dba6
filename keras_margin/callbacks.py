"""Training callbacks: ``NaNLossDiagnosis`` stops ``model.fit`` at the first NaN (or inf) loss and says why it
is likely there; ``Verification`` runs the LFW protocol on the embedding network every few epochs, logs its
figures (History, TensorBoard) and keeps the best model.

Under XLA (``jit_compile=True`` on TensorFlow, or JAX's compiled steps) no check on values can raise inside
the step, so the margin heads and losses mark a row whose class id is outside ``[0, num_classes)`` with NaN
instead of computing a plausible number from a wrong column: the loss of that batch is NaN. This callback
turns that NaN into an error naming the epoch and batch, with the likely causes.
"""

from __future__ import annotations

import math
import numbers
import os
import warnings
from pathlib import Path
from typing import Sequence

import keras
import numpy as np

__all__ = ["NaNLossDiagnosis", "NaNLossError", "Verification"]


class NaNLossError(ValueError):
    """Raised by ``NaNLossDiagnosis`` when a training batch gives a NaN or inf loss."""


class NaNLossDiagnosis(keras.callbacks.Callback):
    """Stop training at the first NaN or inf loss with an error naming the batch, the epoch and the likely causes.

    Unlike ``keras.callbacks.TerminateOnNaN``, which stops quietly, this raises ``NaNLossError`` (a
    ``ValueError``) whose message names the epoch (counted from 1, as the progress bar does) and the batch
    (counted from 0 within the epoch), lists the likely causes (class ids outside ``[0, num_classes)`` of the
    model's margin heads, NaN or inf embeddings or inputs, a too large learning rate or scale) and suggests
    ``run_eagerly=True``, under which the heads and losses raise a ``ValueError`` naming the bad class ids.
    ``model.stop_training`` is set before raising. The epoch and batch are also kept as ``epoch`` and
    ``batch`` (None until a NaN is seen).

    Args:
        raise_error: Boolean; when False, only stop training (``model.stop_training = True``) and print
            the diagnosis instead of raising. Defaults to `True`.

    Example:
    >>> import numpy as np, keras
    >>> from keras_margin import AMSoftmaxHead
    >>> model = keras.Sequential([keras.Input((4,)), AMSoftmaxHead(3)])
    >>> model.compile("sgd", loss=model.layers[-1].loss, jit_compile=True)
    >>> x, y = np.ones((4, 4), "float32"), np.array([0, 1, 2, 7])  # 7 is not a class
    >>> try:
    ...     model.fit(x, y, batch_size=2, verbose=0, callbacks=[NaNLossDiagnosis()])
    ... except NaNLossError as error:
    ...     print(str(error).splitlines()[0])
    NaNLossDiagnosis: the training loss is nan at epoch 1, batch 1 ...
    """

    def __init__(self, raise_error: bool = True):
        super().__init__()
        if not isinstance(raise_error, bool):
            raise ValueError(f"NaNLossDiagnosis: `raise_error` must be a bool; got {raise_error!r}.")
        self.raise_error = raise_error
        self.epoch = None
        self.batch = None
        self._current_epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._current_epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is None:
            return
        try:
            value = float(loss)
        except (TypeError, ValueError):  # a non-scalar loss: nothing this callback can judge
            return
        if math.isfinite(value):
            return
        self.epoch, self.batch = self._current_epoch + 1, int(batch)
        if self.model is not None:
            self.model.stop_training = True
        message = self.diagnosis(value)
        if self.raise_error:
            raise NaNLossError(message)
        print(message)

    def diagnosis(self, value: float) -> str:
        """The error message for a loss ``value`` at the recorded epoch and batch."""
        heads = self._heads()
        if heads:
            class_ids = "; ".join(f"[0, {head.num_classes}) for head {head.name!r}" for head in heads)
        else:
            class_ids = "[0, num_classes) of the margin head or loss"
        return (
            f"NaNLossDiagnosis: the training loss is {value} at epoch {self.epoch}, batch {self.batch} "
            "(epochs counted from 1, batches from 0 within the epoch).\n"
            "Likely causes:\n"
            f"- class ids outside {class_ids}: under XLA (jit_compile=True, or JAX) the margin heads and losses "
            "cannot raise on them and give those rows a NaN loss instead;\n"
            "- NaN or inf embeddings (or inputs) reaching the head;\n"
            "- a diverging step (learning rate or scale s too large for the data).\n"
            "Rerun with model.compile(..., run_eagerly=True) (or jit_compile=False on TensorFlow) to get a "
            "ValueError naming the out-of-range class ids or the non-finite embedding rows."
        )

    def _heads(self) -> list:
        if self.model is None:
            return []
        from keras_margin import _keras_private
        from keras_margin.layers import MarginHead

        try:
            layers = _keras_private.flatten_layers(self.model, include_self=False)
        except AttributeError:  # pragma: no cover - a model without Keras' layer tracking
            return []
        return [layer for layer in layers if isinstance(layer, MarginHead)]


class Verification(keras.callbacks.Callback):
    """Run the LFW verification protocol on the model's embedding network every ``every`` epochs.

    At the end of every ``every``-th epoch each distinct image of the pairs file is embedded once with the
    embedding network (``keras_margin.evaluation.compute_embeddings``, with the flip trick when ``flip``), a
    pair's score is the cosine of its two embeddings, and ``keras_margin.evaluation.verification_report`` gives
    the figures, exactly as ``keras_margin.evaluation.evaluate_lfw`` computes them. They are written into the
    epoch's ``logs``, so ``model.fit``'s History and a ``keras.callbacks.TensorBoard`` placed after this callback
    record them (TensorBoard puts keys starting with ``val_`` under ``validation/``, the prefix removed):
    ```
    {prefix}_accuracy             10-fold accuracy, each fold's threshold chosen on the other folds
    {prefix}_accuracy_std         standard deviation of the per-fold accuracies
    {prefix}_threshold            the threshold that classifies the most of all pairs right (best_threshold)
    {prefix}_auc, {prefix}_eer    area under the ROC curve, equal error rate
    {prefix}_tar_at_far_1e-03     TAR at each FAR of `far` (key formatted f"{far:.0e}")
    ```
    With ``filepath``, the full model is saved there (``model.save``, written to a temporary file moved onto
    ``filepath`` once complete) at each evaluated epoch where ``logs[monitor]`` exceeds the best value so far;
    ``best`` and ``best_epoch`` (counted from 1) hold that value and epoch, ``reports`` maps each evaluated epoch
    (from 1) to its ``VerificationReport``.

    The pairs file and the images are read and checked in the constructor (a malformed line or a missing image
    is a ``PairsFileError`` naming the file and the line, before any training step); the embedding network and
    the preprocessing (the model's ``InputContract`` completed by ``preprocessing``, see
    ``keras_margin.evaluation.resolve_preprocessing``) are fixed at the start of each ``fit``.

    Formula:
    ```
    e_i = f(x_i) / |f(x_i)|                                             flip=False; f: the embedding network
    e_i = (f(x_i) + f(mirror(x_i))) / |f(x_i) + f(mirror(x_i))|         flip=True
    score(pair) = <e_first, e_second>
    accuracy    = mean_k mean_{pairs in fold k} ((score >= t_k) == same),   t_k = best threshold off fold k
    TAR@FAR     = TAR(t*),   t* = min{t : FAR(t) <= far}                (empirical ROC, never interpolated)
    ```

    Args:
        pairs: the LFW-style pairs file (``pairs.txt`` of View 2, a View 1 file or a header-less list; see
            ``keras_margin.evaluation.parse_pairs``).
        images: the images folder: ``<images>/<name>/<name>_<4-digit number>.<ext>``.
        every: evaluate at the end of epochs every, 2 * every, ... (counted from 1). Defaults to 1.
        embedding_model: a ``keras.Model`` mapping images to embeddings (sharing layers with the trained model).
            Defaults to None.
        embedding_layer: the name of the layer of the trained model whose output is the embedding. Defaults
            to None.
        flip: embed each image plus its mirror (the AM-Softmax deploy net's feature). Defaults to True.
        far: the FAR targets of the TAR@FAR figures. Defaults to (1e-2, 1e-3).
        batch_size: images per model call. Defaults to 64.
        prefix: the start of every key written into ``logs``. Defaults to "val_lfw".
        filepath: a ``.keras`` file to save the best model to, or None (no saving). Defaults to None.
        monitor: the ``logs`` key whose largest value is the best model. Defaults to None
            (``f"{prefix}_accuracy"``).
        verbose: 1: print one line per evaluation; 0: silent. Defaults to 1.
        ext: the image file extension. Defaults to "jpg".
        preprocessing: size, channel order, mean and scale turning the files into model input; None fields come
            from the model's ``InputContract``. Defaults to None.

    With neither ``embedding_model`` nor ``embedding_layer`` the embedding network is the trained model from its
    inputs to the input of its margin head (a ``CosineDense`` or ``MarginHead`` subclass; see
    ``keras_margin.export.embedding_model``); a model without one is a ``ValueError`` naming both options.

    Example:
    >>> import os, numpy as np, keras, tensorflow as tf
    >>> from keras_margin import AMSoftmaxHead
    >>> from keras_margin.evaluation import Preprocessing
    >>> rng = np.random.default_rng(0)
    >>> for person in ("Ann", "Bob"):
    ...     os.makedirs(os.path.join("lfw", person))
    ...     for number in (1, 2):
    ...         pixels = rng.integers(0, 256, (8, 8, 3)).astype("uint8")
    ...         tf.io.write_file(f"lfw/{person}/{person}_{number:04d}.png", tf.io.encode_png(pixels))
    >>> _ = open("pairs.txt", "w").write("2 1\\nAnn 1 2\\nAnn 1 Bob 1\\nBob 1 2\\nBob 2 Ann 2\\n")
    >>> model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten(), keras.layers.Dense(4),
    ...                           AMSoftmaxHead(2)])
    >>> model.compile("sgd", loss=model.layers[-1].loss)
    >>> verification = Verification("pairs.txt", "lfw", ext="png", far=(0.1,), verbose=0,
    ...                             preprocessing=Preprocessing(mean=127.5, scale=1 / 128))
    >>> history = model.fit(rng.random((4, 8, 8, 3)), np.array([0, 1, 0, 1]), epochs=2, verbose=0,
    ...                     callbacks=[verification])
    >>> sorted(key for key in history.history if key.startswith("val_lfw"))
    ['val_lfw_accuracy', 'val_lfw_accuracy_std', 'val_lfw_auc', 'val_lfw_eer', 'val_lfw_tar_at_far_1e-01', \
'val_lfw_threshold']
    >>> sorted(verification.reports), 0.0 <= history.history["val_lfw_accuracy"][-1] <= 1.0
    ([1, 2], True)

    Reference:
        Huang et al., "Labeled Faces in the Wild: A Database for Studying Face Recognition in Unconstrained
        Environments", UMass Amherst TR 07-49, 2007 (the 10-fold protocol); Liao et al., "A Benchmark Study of
        Large-scale Unconstrained Face Recognition", IJCB 2014 (BLUFR: TAR at FAR).
    """

    def __init__(self, pairs: str | os.PathLike, images: str | os.PathLike, every: int = 1,
                 embedding_model: keras.Model | None = None, embedding_layer: str | None = None, flip: bool = True,
                 far: float | Sequence[float] = (1e-2, 1e-3), batch_size: int = 64, prefix: str = "val_lfw",
                 filepath: str | os.PathLike | None = None, monitor: str | None = None, verbose: int = 1, *,
                 ext: str = "jpg", preprocessing=None):
        super().__init__()
        from keras_margin.evaluation.images import Preprocessing
        from keras_margin.evaluation.lfw import index_pairs
        from keras_margin.evaluation.metrics import kfold_accuracy
        from keras_margin.evaluation.pairs import PairsFileError

        def positive_int(name, value):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"Verification: `{name}` must be an integer >= 1; got {value!r}.")
            return int(value)

        self.every = positive_int("every", every)
        self.batch_size = positive_int("batch_size", batch_size)
        if embedding_model is not None and embedding_layer is not None:
            raise ValueError("Verification: give `embedding_model` or `embedding_layer`, not both.")
        if embedding_model is not None and not isinstance(embedding_model, keras.Model):
            raise ValueError(f"Verification: `embedding_model` must be a keras.Model; got {type(embedding_model)}.")
        if embedding_layer is not None and (not isinstance(embedding_layer, str) or not embedding_layer):
            raise ValueError(f"Verification: `embedding_layer` must be a layer name; got {embedding_layer!r}.")
        if not isinstance(flip, bool):
            raise ValueError(f"Verification: `flip` must be a bool; got {flip!r}.")
        targets = [far] if isinstance(far, numbers.Real) else list(far) if isinstance(far, (list, tuple)) else None
        if not targets or any(isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0.0 <= v <= 1.0
                              for v in targets):
            raise ValueError(f"Verification: `far` must be a FAR in [0, 1] or a non-empty list of them; got {far!r}.")
        if not isinstance(prefix, str) or not prefix:
            raise ValueError(f"Verification: `prefix` must be a non-empty string; got {prefix!r}.")
        if monitor is not None and (not isinstance(monitor, str) or not monitor):
            raise ValueError(f"Verification: `monitor` must be a logs key; got {monitor!r}.")
        if verbose not in (0, 1) or not isinstance(verbose, numbers.Integral):
            raise ValueError(f"Verification: `verbose` must be 0 or 1; got {verbose!r}.")
        if not isinstance(ext, str) or not ext or "/" in ext:
            raise ValueError(f"Verification: `ext` must be a file extension such as 'jpg'; got {ext!r}.")
        if preprocessing is not None and not isinstance(preprocessing, Preprocessing):
            raise ValueError("Verification: `preprocessing` must be a keras_margin.evaluation.Preprocessing; got "
                             f"{type(preprocessing)}.")
        if filepath is not None:
            from keras_margin.export._files import check_writable

            if not isinstance(filepath, (str, os.PathLike)) or not os.fspath(filepath).endswith(".keras"):
                raise ValueError(f"Verification: `filepath` must be a file name ending in '.keras'; got {filepath!r}.")
            check_writable(filepath, "Verification: `filepath`")
            filepath = Path(filepath)
        self.embedding_model = embedding_model
        self.embedding_layer = embedding_layer
        self.flip = flip
        self.far = tuple(float(v) for v in targets)
        self.prefix = prefix
        self.filepath = filepath
        self.monitor = f"{prefix}_accuracy" if monitor is None else monitor
        self.verbose = int(verbose)
        self.ext = ext
        self.preprocessing = preprocessing

        self.pairs_file, self.images = Path(pairs), Path(images)
        indexed = index_pairs(self.pairs_file, self.images, ext=ext)
        self.pairs, self.image_files = indexed.pairs, indexed.paths
        self._first, self._second, self._labels, self._folds = (indexed.first, indexed.second, indexed.labels,
                                                               indexed.folds)
        try:  # the folds and the kinds of pair the protocol needs, checked now rather than after an epoch
            kfold_accuracy(self._labels, np.zeros(len(self.pairs)), self._folds)
        except ValueError as error:
            raise PairsFileError(f"{self.pairs_file}: {error}") from None

        self.best = -math.inf
        self.best_epoch = None
        self.reports: dict = {}
        self.network = None
        self._resolved = None

    def on_train_begin(self, logs=None):
        from keras_margin.evaluation.contract import PreprocessingWarning, resolve_preprocessing

        self.network = self._embedding_network()
        self._resolved = resolve_preprocessing(self.network, self.preprocessing, self.flip)
        for message in self._resolved.warnings:
            warnings.warn(f"Verification: {message}", PreprocessingWarning, stacklevel=2)

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every:
            return
        if self.network is None:  # on_epoch_end called outside fit
            self.on_train_begin()
        report = self.evaluate(epoch + 1)
        figures = {"accuracy": report.accuracy, "accuracy_std": report.accuracy_std,
                   "threshold": report.best_threshold, "auc": report.auc, "eer": report.eer}
        for target, (tar, _) in report.tar_at_far.items():
            figures[f"tar_at_far_{target:.0e}"] = tar
        logs = {} if logs is None else logs
        logs.update({f"{self.prefix}_{name}": float(value) for name, value in figures.items()})
        saved = self._save_if_best(epoch + 1, logs) if self.filepath is not None else False
        if self.verbose:
            tars = ", ".join(f"TAR@FAR={target:.0e} {100 * tar:.2f}%" for target, (tar, _) in report.tar_at_far.items())
            note = f"; {self.monitor} improved, model saved to {self.filepath}" if saved else ""
            print(f"Epoch {epoch + 1}: {self.prefix} accuracy {100 * report.accuracy:.2f}% "
                  f"+- {100 * report.accuracy_std:.2f}%, {tars}, threshold {report.best_threshold:.4f}{note}")

    def evaluate(self, epoch: int):
        """The ``VerificationReport`` of the embedding network now, kept in ``reports[epoch]``."""
        from keras_margin.evaluation.embeddings import compute_embeddings, cosine_scores
        from keras_margin.evaluation.metrics import verification_report

        embeddings = compute_embeddings(self.network, self.image_files, batch_size=self.batch_size,
                                        flip=self._resolved.flip, preprocessing=self._resolved.preprocessing,
                                        progress=False, ignore_contract=True)
        scores = cosine_scores(embeddings[self._first], embeddings[self._second])
        try:
            report = verification_report(self._labels, scores, self._folds, self.far)
        except ValueError as error:  # NaN or inf embeddings: the training diverged
            raise ValueError(f"Verification: epoch {epoch}: {error} (the embeddings of the pairs' images are not "
                             "all finite)") from None
        self.reports[epoch] = report
        return report

    def _save_if_best(self, epoch: int, logs: dict) -> bool:
        from keras_margin.export._files import atomic_output

        if self.monitor not in logs:
            raise ValueError(f"Verification: `monitor` {self.monitor!r} is not in the logs of epoch {epoch}; "
                             f"the keys are {sorted(logs)}.")
        value = float(logs[self.monitor])
        if not value > self.best:
            return False
        with atomic_output(self.filepath) as partial:
            self.model.save(str(partial))
        self.best, self.best_epoch = value, epoch
        return True

    def _embedding_network(self) -> keras.Model:
        """The network mapping images to embeddings: given, cut at ``embedding_layer``, or before the margin head."""
        if self.embedding_model is not None:
            network = self.embedding_model
        elif self.embedding_layer is not None:
            network = self._cut_at_layer(self.embedding_layer)
        else:
            from keras_margin.export.embedding import embedding_model

            try:
                network = embedding_model(self.model)
            except ValueError as error:
                raise ValueError(f"Verification: {error}; or pass `embedding_model` (a keras.Model from images to "
                                 "embeddings) or `embedding_layer` (the name of the embedding layer)") from None
            if network is self.model:
                raise ValueError(
                    f"Verification: model '{self.model.name}' has no keras_margin margin head (CosineDense or a "
                    "MarginHead subclass) whose input would be the embedding; pass `embedding_model` (a keras.Model "
                    "from images to embeddings) or `embedding_layer` (the name of the layer whose output is the "
                    "embedding)")
        if len(network.inputs) != 1:
            raise ValueError(f"Verification: the embedding network '{network.name}' has {len(network.inputs)} inputs; "
                             "it must take only the images: pass `embedding_model` mapping images to embeddings")
        return network

    def _cut_at_layer(self, name: str) -> keras.Model:
        from keras_margin.export.embedding import _ancestor_inputs

        names = [layer.name for layer in self.model.layers]
        if name not in names:
            raise ValueError(f"Verification: `embedding_layer` {name!r} is not a layer of model '{self.model.name}'; "
                             f"its layers are {names}.")
        output = self.model.get_layer(name).output
        inputs = _ancestor_inputs(output, list(self.model.inputs))
        return keras.Model(inputs if len(inputs) > 1 else inputs[0], output, name=f"{self.model.name}_{name}")
