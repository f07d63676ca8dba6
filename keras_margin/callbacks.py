"""Training callbacks: ``NaNLossDiagnosis`` stops ``model.fit`` at the first NaN (or inf) loss and says why it
is likely there.

Under XLA (``jit_compile=True`` on TensorFlow, or JAX's compiled steps) no check on values can raise inside
the step, so the margin heads and losses mark a row whose class id is outside ``[0, num_classes)`` with NaN
instead of computing a plausible number from a wrong column: the loss of that batch is NaN. This callback
turns that NaN into an error naming the epoch and batch, with the likely causes.
"""

from __future__ import annotations

import math

import keras

__all__ = ["NaNLossDiagnosis", "NaNLossError"]


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
