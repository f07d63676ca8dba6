"""Cosine classifier layers: ``CosineDense`` and the margin heads built on it.

Called on embeddings alone a head outputs cos(theta) (batch, num_classes) and its ``loss`` attribute
applies the margin; called as ``head([embeddings, labels], training=True)`` it returns margin logits, or,
with ``fused_loss=True``, adds and returns its own (optionally chunked or class-sampled) loss.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import initializers, ops

from keras_margin import _validation, chunked, losses, sampling
from keras_margin.core import (
    cosine_matrix,
    margin_cross_entropy,
    margin_logits,
    margin_softmax_loss,
    sparse_labels,
    target_cosines,
)
from keras_margin.margins import (
    adacos,
    adaface,
    amsoftmax,
    amsoftmax_target,
    arcface,
    arcface_target,
    combined_margin_target,
    curricularface,
    lsoftmax,
    magface,
    normface,
    normface_agents,
    normface_target,
    sphereface,
    sphereface_lambda,
    sphereface_target,
    x2softmax,
    x2softmax_target,
)

__all__ = [
    "CosineDense",
    "MarginHead",
    "NormFaceHead",
    "SphereFaceHead",
    "AMSoftmaxHead",
    "X2SoftmaxHead",
    "ArcFaceHead",
    "CombinedMarginHead",
    "NormFaceContrastiveHead",
    "SubCenterArcFaceHead",
    "CurricularFaceHead",
    "AdaCosHead",
    "AdaFaceHead",
    "MagFaceHead",
    "LSoftmaxHead",
]


#: A head's ``kernel_layout``: (embedding_dim, num_classes) or class-major (num_classes, embedding_dim).
KERNEL_LAYOUTS = ("classes_last", "classes_first")

_KERNEL_ARGS = """\
        kernel_initializer: Initializer for the kernel `(embedding_dim, num_classes)`, as for
            `keras.layers.Dense`. Defaults to `"glorot_uniform"`.
        kernel_regularizer: Regularizer function applied to the kernel. Defaults to `None`.
        kernel_constraint: Constraint function applied to the kernel. Defaults to `None`.
        kernel_layout: `"classes_last"`, a kernel of shape `(embedding_dim, num_classes)` as for
            `keras.layers.Dense` (and the Caffe import), or `"classes_first"`, `(num_classes, embedding_dim)`,
            one row per class as InsightFace stores it: the same numbers, transposed. Class-major rows are
            contiguous in memory, which makes Partial FC's gathers and writes of the sampled classes
            several times cheaper (`sample_rate` < 1, above all with `sample_update="sampled"`). The
            initializer sees the transposed shape: fan-in and fan-out swap, which leaves `"glorot_uniform"`
            as it is but not a fan-in scaled one (`"he_normal"`, `"lecun_normal"`). Defaults to
            `"classes_last"`."""

# The options every margin head takes (MarginHead's), documented once and shown in each head's help().
_HEAD_ARGS = """\
        fused_loss: Boolean. When True, `head([x, labels], training=...)` computes the loss itself:
            it returns the per-sample loss `(batch,)` and adds its batch mean with `add_loss` (compile
            with `loss=None`), so very many classes fit in memory. Defaults to `False`.
        chunk_size: Integer or `None`. With `fused_loss=True`, compute the exact loss by chunks of
            `chunk_size` classes (or rows: `chunk_by`), so the `(batch, num_classes)` logits never
            exist; the memory bound needs XLA (JAX, or `jit_compile=True` on TensorFlow). `None`: no
            chunking. Defaults to `None`.
        chunk_by: `"classes"` or `"rows"`, what `chunk_size` counts. `"classes"`: a running
            log-sum-exp over class chunks and a recomputing backward pass (four matrix products,
            the least memory: a few `(batch, chunk_size)` blocks). `"rows"`: chunks of the batch,
            each against every class, the gradient formed in the forward pass (three products, the
            dense path's count, but each chunk rewrites the kernel gradient; a few `(chunk_size,
            num_classes)` blocks; README "Measured figures" compares the two). Defaults to
            `"classes"`.
        sample_rate: Float in (0, 1]. With `fused_loss=True` and < 1: Partial FC (InsightFace); each
            training step keeps the batch's classes plus a uniform random subset of the others,
            `max(ceil(sample_rate * num_classes), batch)` classes in all (an approximation of the loss;
            evaluation uses every class). Defaults to `1.0` (all classes).
        sample_update: `"all"` or `"sampled"`, what the optimizer does to the columns a Partial FC step
            did not sample (their gradient is zero). `"all"`: InsightFace's PartialFC_V2; the optimizer
            steps every column, so momentum and weight decay still move unsampled ones. `"sampled"`:
            InsightFace's first PartialFC; unsampled columns and their optimizer state stay as they
            are. Needs `sample_rate` < 1 and the optimizer wrapped in
            `keras_margin.PartialFCOptimizer`, which reads the sample from the gradient of an extra
            `(num_classes,)` weight, `sampled_columns`, and the sampled columns' gradient from that of a
            `(embedding_dim, K)` weight, `sample_gradient`; both are overwritten with their gradient, so
            after a step `sampled_columns` holds the step's sample (1.0 sampled, 0.0 not). Each step
            then keeps a fixed K = `ceil(sample_rate * num_classes)` classes, which must hold the
            batch's classes: a batch larger than K is refused. Defaults to `"all"`.
{{kernel_args}}
        **kwargs: Base layer keyword arguments, such as `name` and `dtype`."""

_CALL_FORMS = """\
    Call arguments:
        inputs: The embeddings `x` alone, or the list `[x, labels]` with labels as integer class ids
            `(batch,)` / `(batch, 1)` or one-hot `(batch, num_classes)`.
        training: Boolean; with `[x, labels]`, whether to apply the margin. Defaults to `None` (no margin).

    Call forms:
        - `head(x)`: cos(theta); compile with `loss=head.loss` (the matching cosine-path loss).
        - `head([x, labels], training=True)`: margin logits, for
          `keras.losses.SparseCategoricalCrossentropy(from_logits=True)`; `training` False or `None`
          gives the same logits without the margin.
        - With `fused_loss=True`, `head([x, labels], training=...)`: the per-sample loss, also added
          with `add_loss` (margin only when `training` is True); `head(x)` still gives the cosines.

    Input shape:
        - `head(x)`: 2D tensor `(batch_size, embedding_dim)`.
        - `head([x, labels])`: `[(batch_size, embedding_dim), (batch_size,)]` (labels may also be
          `(batch_size, 1)` or one-hot `(batch_size, num_classes)`).

    Output shape:
        - `head(x)`: `(batch_size, num_classes)`, float32 cosines.
        - `head([x, labels])`: `(batch_size, num_classes)`, float32 logits.
        - `head([x, labels])` with `fused_loss=True`: `(batch_size,)`, float32 per-sample loss."""


def _document_head(cls):
    """Fill a head's ``{{head_args}}``/``{{call_forms}}`` placeholders with MarginHead's shared sections."""
    doc = cls.__doc__
    doc = doc.replace("{{head_args}}", _HEAD_ARGS).replace("{{call_forms}}", _CALL_FORMS)
    cls.__doc__ = doc.replace("{{kernel_args}}", _KERNEL_ARGS)
    return cls


@_document_head
@keras.saving.register_keras_serializable(package="keras_margin")
class CosineDense(keras.layers.Layer):
    """Dense layer without bias whose output is the cosine between the input and each class weight.

    Formula:
    ```
    cos_theta[i, j] = <x_i / |x_i|, W[:, j] / |W[:, j]|>     W: kernel of shape (embedding_dim, units)
    ```
    The matrix product runs in the layer's compute dtype (float16/bfloat16 under mixed precision); norms
    and the output are float32, so margins and the softmax downstream stay in float32.

    Args:
        units: Integer, the number of classes (columns of the kernel), >= 1.
{{kernel_args}}
        **kwargs: Base layer keyword arguments, such as `name` and `dtype`.

    Input shape:
        2D tensor `(batch_size, embedding_dim)`: the embeddings.

    Output shape:
        2D tensor `(batch_size, units)`, float32: the cosines.

    Example:
    >>> import numpy as np, keras
    >>> layer = CosineDense(3, kernel_initializer="identity")
    >>> cos = layer(np.array([[2.0, 0.0, 0.0], [1.0, 1.0, 0.0]], "float32"))
    >>> np.round(keras.ops.convert_to_numpy(cos), 4)
    array([[1.    , 0.    , 0.    ],
           [0.7071, 0.7071, 0.    ]], dtype=float32)
    """

    _classes_last_only = ""  # why a subclass keeps the (embedding_dim, units) kernel; empty: both layouts

    def __init__(self, units: int, kernel_initializer="glorot_uniform", kernel_regularizer=None,
                 kernel_constraint=None, kernel_layout: str = "classes_last", **kwargs):
        super().__init__(**kwargs)
        self.units = _validation.check_count(type(self).__name__, "units", units, minimum=1)
        if kernel_layout not in KERNEL_LAYOUTS:
            raise ValueError(f"{type(self).__name__}: `kernel_layout` must be one of {KERNEL_LAYOUTS}; got "
                             f"{kernel_layout!r}.")
        if kernel_layout != "classes_last" and self._classes_last_only:
            raise ValueError(f"{type(self).__name__}: `kernel_layout` must be 'classes_last': "
                             f"{self._classes_last_only}")
        self.kernel_layout = kernel_layout
        self.kernel_initializer = initializers.get(kernel_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.kernel_constraint = keras.constraints.get(kernel_constraint)

    # Heads accept [embeddings, labels]; the embeddings' shape is what the weights depend on.
    @staticmethod
    def _embedding_shape(input_shape):
        if isinstance(input_shape, (list, tuple)) and input_shape and isinstance(input_shape[0], (list, tuple)):
            return tuple(input_shape[0])
        return tuple(input_shape)

    def build(self, input_shape):
        shape = self._embedding_shape(input_shape)
        if len(shape) != 2 or shape[-1] is None:
            raise ValueError(
                f"{type(self).__name__}: embeddings must have shape (batch, embedding_dim) with a known "
                f"embedding_dim; got shape {shape}. Add keras.layers.Flatten() or a pooling layer first."
            )
        self.kernel = self.add_weight(
            name="kernel",
            shape=(self.units, shape[-1]) if self.classes_first else (shape[-1], self.units),
            initializer=self.kernel_initializer,
            regularizer=self.kernel_regularizer,
            constraint=self.kernel_constraint,
        )

    @property
    def classes_first(self) -> bool:
        """Whether the kernel is class-major, (num_classes, embedding_dim) (``kernel_layout="classes_first"``)."""
        return self.kernel_layout == "classes_first"

    @property
    def embedding_dim(self) -> int:
        """The embedding size the built kernel expects."""
        return self.kernel.shape[1] if self.classes_first else self.kernel.shape[0]

    def cosine(self, x):
        _validation.check_embeddings(type(self).__name__, x, self.embedding_dim)
        return cosine_matrix(x, self.kernel, self.compute_dtype, self.classes_first)

    def call(self, inputs):
        return self.cosine(inputs)

    def compute_output_shape(self, input_shape):
        return (self._embedding_shape(input_shape)[0], self.units)

    def compute_output_spec(self, inputs, *args, **kwargs):
        x = inputs[0] if isinstance(inputs, (list, tuple)) else inputs
        return keras.KerasTensor((x.shape[0], self.units), dtype="float32")

    def get_config(self):
        config = super().get_config()
        config.update({
            "units": self.units,
            "kernel_initializer": initializers.serialize(self.kernel_initializer),
            "kernel_regularizer": keras.regularizers.serialize(self.kernel_regularizer),
            "kernel_constraint": keras.constraints.serialize(self.kernel_constraint),
            "kernel_layout": self.kernel_layout,
        })
        return config


@_document_head
class MarginHead(CosineDense):
    """Base of the margin heads: cosine output, label-aware margin logits and a matching ``loss``.

    Subclasses implement ``target(cos_theta_y)`` (the objective's modified target cosine) and
    ``make_loss()``; SphereFace also overrides the scale (|x| instead of s). Every head takes the
    options below (`fused_loss`, `chunk_size`, `sample_rate`, the kernel arguments); each head's own
    docstring repeats them, so ``help(AMSoftmaxHead)`` shows them.

    Fused loss, for very many classes (``fused_loss=True``):
    - ``head([x, labels], training=...)`` returns the per-sample loss, shape (batch,), float32, and adds
      its batch mean with ``self.add_loss``: build a functional model on ``[inputs, labels]`` and compile
      with ``loss=None`` (a Sequential model cannot pass labels to a layer, so it keeps ``head.loss``).
      The margin applies when ``training`` is True; otherwise the loss is the plain ``s * cos`` softmax.
      Sample weights are not applied to the added loss. ``head(x)`` still returns the cosines.
    - ``chunk_size=N``: the exact loss computed over chunks of N classes with a running log-sum-exp and
      a backward pass that recomputes each chunk, so the (batch, num_classes) logits never exist
      (memory O(batch x N + num_classes x embedding_dim)); equal to the unchunked loss to float32
      rounding. With ``chunk_by="rows"`` the chunks are N rows of the batch, each against every class,
      its gradient formed in the forward pass: three matrix products instead of four, memory
      O(N x num_classes + num_classes x embedding_dim). The memory bound needs XLA: JAX, or
      ``jit_compile=True`` on TensorFlow (Keras leaves XLA off on a CPU-only TensorFlow, where the
      chunked loss is exact but saves no memory).
    - ``sample_rate=r`` < 1: Partial FC (InsightFace): each training step keeps the batch's classes plus
      a uniform random subset of the others, ``max(ceil(r * C), batch)`` classes in all, and only those
      kernel columns get a gradient. This approximates the loss (the softmax sees only the sampled
      negatives); evaluation (training False) uses every class.

    Formula (fused, chunked):
    ```
    lse_other = log(sum_{j != y} exp(scale * cos(theta_j)))       chunk by chunk (of classes or rows)
    z_y = scale * target(cos(theta_y))
    loss = log(exp(lse_other) + exp(z_y)) - z_y
    ```

    Args:
        num_classes: Integer, the number of classes, >= 2.
        s: Float, the scale turning cosines into logits, > 0 (each head's default is its objective's).
{{head_args}}

{{call_forms}}

    Example:
    >>> import numpy as np, keras
    >>> embeddings, labels = keras.Input((8,)), keras.Input((), dtype="int32")
    >>> head = AMSoftmaxHead(1000, chunk_size=256, fused_loss=True)
    >>> model = keras.Model([embeddings, labels], head([embeddings, labels]))
    >>> model.compile("sgd", loss=None, jit_compile=True)
    >>> x, y = np.random.rand(32, 8).astype("float32"), np.arange(32)
    >>> history = model.fit([x, y], epochs=1, batch_size=16, verbose=0)
    >>> bool(np.isfinite(history.history["loss"][0]))
    True
    """

    def __init__(self, num_classes: int, s: float, chunk_size: int | None = None,
                 sample_rate: float = 1.0, fused_loss: bool = False, chunk_by: str = "classes",
                 sample_update: str = "all", **kwargs):
        owner = type(self).__name__
        num_classes = _validation.check_count(owner, "num_classes", num_classes, minimum=2)
        super().__init__(num_classes, **kwargs)
        self.s = _validation.check_scale(owner, s)
        self.fused_loss = _validation.check_bool(owner, "fused_loss", fused_loss)
        self.chunk_size = (None if chunk_size is None
                           else _validation.check_count(owner, "chunk_size", chunk_size, minimum=1))
        self.sample_rate = sampling.check_sample_rate(owner, sample_rate)
        self.chunk_by = chunked.check_chunk_by(owner, chunk_by)
        if self.chunk_by != "classes" and self.chunk_size is None:
            raise ValueError(f"{owner}: `chunk_by={chunk_by!r}` says what `chunk_size` counts; pass chunk_size too.")
        if self.chunk_by == "rows" and self.classes_first:
            raise ValueError(f"{owner}: `chunk_by='rows'` is implemented for the (embedding_dim, num_classes) kernel "
                             "only; with kernel_layout='classes_first' chunk by classes.")
        if not fused_loss and (self.chunk_size is not None or self.sample_rate < 1.0):
            raise ValueError(
                f"{owner}: `chunk_size` and `sample_rate` apply to the loss the head computes itself; pass "
                "fused_loss=True as well (head([x, labels]) then adds and returns the per-sample loss; compile "
                "with loss=None)."
            )
        self.sample_update = sampling.check_sample_update(owner, sample_update, self.sample_rate)
        if self.sample_rate < 1.0:
            self.seed_generator = keras.random.SeedGenerator()
        losses.register_head(self)

    def build(self, input_shape):
        super().build(input_shape)
        if self.sample_update == "sampled":
            # Its gradient is the step's sample (sampling.take_columns); PartialFCOptimizer reads it. Overwritten
            # with that gradient by any Keras optimizer (no momentum or decay), so it is never a parameter.
            self.sampled_columns = self.add_weight(name="sampled_columns", shape=(self.units,), dtype="float32",
                                                   initializer="zeros")
            self.sampled_columns.overwrite_with_gradient = True
            # Its gradient is the sampled columns' gradient, (d, K) ((K, d) class-major): PartialFCOptimizer
            # steps them from it.
            shape = (self.num_sampled, self.embedding_dim) if self.classes_first else (self.embedding_dim,
                                                                                        self.num_sampled)
            self.sample_gradient = self.add_weight(name="sample_gradient", shape=shape, dtype=self.kernel.dtype,
                                                   initializer="zeros")
            self.sample_gradient.overwrite_with_gradient = True
            sampling.pair_sample_marker(self.sampled_columns, self.kernel, self.sample_gradient, self.classes_first)

    @property
    def num_sampled(self) -> int:
        """K, the classes a training step keeps with ``sample_rate`` < 1 (before a larger batch raises it;
        with ``sample_update="sampled"`` it is fixed)."""
        return sampling.num_sampled_classes(self.units, self.sample_rate)

    @property
    def num_classes(self) -> int:
        return self.units

    @property
    def loss(self) -> keras.losses.Loss:
        """The cosine-path loss configured with this head's hyper-parameters."""
        return self.make_loss()

    def make_loss(self) -> keras.losses.Loss:
        raise NotImplementedError

    def target(self, cos_theta_y):
        raise NotImplementedError

    def scale(self, x):
        """The factor that turns cosines into logits (s; SphereFace uses |x|)."""
        return self.s

    def call(self, inputs, training=None):
        if not isinstance(inputs, (list, tuple)):
            return self.cosine(inputs)
        if len(inputs) != 2:
            raise ValueError(
                f"{type(self).__name__}: expected embeddings or [embeddings, labels]; got {len(inputs)} inputs."
            )
        x, labels = inputs
        if self.fused_loss:
            _validation.check_embeddings(type(self).__name__, x, self.embedding_dim)
            class_ids = sparse_labels(type(self).__name__, labels, self.units, batch=x.shape[0])
            per_sample = self.per_sample_loss(x, class_ids, training=bool(training))
            self.add_loss(ops.mean(per_sample))
            return per_sample
        cos_theta = self.cosine(x)
        class_ids = sparse_labels(type(self).__name__, labels, self.units, batch=x.shape[0])
        return self.label_logits(cos_theta, class_ids, bool(training), x)

    def label_logits(self, cos_theta, class_ids, training: bool, x):
        """Logits of the unfused ``head([x, labels])`` call: the margin when training, ``scale * cos`` otherwise."""
        target = self.training_target() if training else (lambda c: c)
        return margin_logits(cos_theta, class_ids, target, self.scale(x))

    def per_sample_loss(self, x, class_ids, training: bool = False):
        """Per-sample loss (batch,) of embeddings and int32 class ids, with ``chunk_size`` / ``sample_rate``.

        The target function, scale and cosines are the head's own (``training_target``, ``scale``,
        ``core.cosine_matrix``); ``keras_margin.chunked.margin_loss`` chunks them. A training call
        advances SphereFace's schedule once, however many chunks there are.
        """
        target = self.training_target() if training else (lambda c: c)
        kernel, class_ids = self.step_kernel(x, class_ids, training)
        return chunked.margin_loss(x, kernel, class_ids, target, self.scale(x), self.chunk_size,
                                   self.compute_dtype, chunk_by=self.chunk_by, classes_first=self.classes_first)

    def step_kernel(self, x, class_ids, training: bool):
        """``(kernel, class_ids)`` of one fused-loss call: with ``sample_rate`` < 1 in training, the sampled
        columns (Partial FC) and the labels re-indexed into them; otherwise the whole kernel and int32 labels.
        The kernel keeps the head's layout (the sampled rows of a class-major one)."""
        kernel, class_ids = self.kernel, ops.cast(class_ids, "int32")
        if training and self.sample_rate < 1.0:
            num_sampled = sampling.num_sampled_classes(self.units, self.sample_rate, x.shape[0])
            v1 = self.sample_update == "sampled"
            if v1 and num_sampled != self.num_sampled:
                raise ValueError(
                    f"{type(self).__name__}: sample_update='sampled' keeps a fixed ceil(sample_rate * num_classes) "
                    f"= {self.num_sampled} classes per step, fewer than the batch of {x.shape[0]}, whose classes "
                    f"must all be kept; raise sample_rate to at least {x.shape[0]} / {self.units} or lower the batch.")
            markers = (self.sampled_columns, self.sample_gradient) if v1 else (None, None)
            if num_sampled < self.units:
                sampled, class_ids = sampling.sample_classes(class_ids, self.units, num_sampled, self.seed_generator)
                kernel = sampling.take_columns(kernel, sampled, *markers, classes_first=self.classes_first)
            elif v1:  # the sample is every class: every column is in the step
                kernel = sampling.take_columns(kernel, ops.arange(self.units, dtype="int32"), *markers,
                                               classes_first=self.classes_first)
        return kernel, class_ids

    def compute_output_shape(self, input_shape):
        if self.fused_loss and isinstance(input_shape, (list, tuple)) and isinstance(input_shape[0], (list, tuple)):
            return (self._embedding_shape(input_shape)[0],)
        return super().compute_output_shape(input_shape)

    def compute_output_spec(self, inputs, *args, **kwargs):
        if self.fused_loss and isinstance(inputs, (list, tuple)):
            return keras.KerasTensor((inputs[0].shape[0],), dtype="float32")
        return super().compute_output_spec(inputs, *args, **kwargs)

    def training_target(self):
        """The target function used by a training call (SphereFace advances its schedule here)."""
        return self.target

    def get_config(self):
        config = super().get_config()
        config.pop("units")
        config.update({"num_classes": self.units, "s": self.s, "chunk_size": self.chunk_size,
                       "sample_rate": self.sample_rate, "fused_loss": self.fused_loss, "chunk_by": self.chunk_by,
                       "sample_update": self.sample_update})
        return config


class _AtLeast(keras.constraints.Constraint):
    """Projects a weight onto ``w >= floor`` after each update (Caffe's Scale ``min_value``)."""

    def __init__(self, floor: float):
        self.floor = floor

    def __call__(self, w):
        return ops.maximum(w, ops.cast(self.floor, w.dtype))

    def get_config(self):
        return {"floor": self.floor}


@_document_head
@keras.saving.register_keras_serializable(package="keras_margin")
class NormFaceHead(MarginHead):
    """NormFace normalized-softmax head (Wang et al. 2017, arXiv 1704.06369, Eq. 6).

    Formula:
    ```
    z_j = s * cos(theta_j)    for all j (no margin); s fixed, or learned with s >= scale_min
    ```
    ``loss``: ``NormFaceLoss(s)``; with ``learn_scale=True`` a ``HeadLoss`` that reads the learned s, so
    ``compile(loss=head.loss)`` trains s in a Sequential model too.

    The learned scale follows the released config (``scaled_cosine_softmax.prototxt``: a Caffe ``Scale``
    layer with one scalar, initial value 10, ``min_value: 0.01``): the scalar is clamped to ``scale_min``
    where it is used and projected back onto ``s >= scale_min`` after each optimizer step, as the Caffe
    layer clamps its blob before each forward pass.

    Args:
        num_classes: Integer, the number of classes, >= 2.
        s: Float, the scale, or its initial value when learned, > 0. Defaults to `30.0`.
        learn_scale: Boolean; learn s as a trainable scalar weight `scale_weight`. Defaults to `False`.
        scale_min: Float > 0 or `None`; the floor of a learned s (`None`: no floor). Defaults to `0.01`
            (the released config's `min_value`).
{{head_args}}

{{call_forms}}

    Example:
    >>> import numpy as np, keras
    >>> head = NormFaceHead(3, s=10.0, kernel_initializer="identity")
    >>> x, y = np.array([[2.0, 0.0, 0.0], [0.0, 1.0, 1.0]], "float32"), np.array([0, 1])
    >>> np.round(keras.ops.convert_to_numpy(head(x)), 4)
    array([[1.    , 0.    , 0.    ],
           [0.    , 0.7071, 0.7071]], dtype=float32)
    >>> np.round(keras.ops.convert_to_numpy(head([x, y], training=True)), 3)
    array([[10.   ,  0.   ,  0.   ],
           [ 0.   ,  7.071,  7.071]], dtype=float32)

    Reference:
        Wang et al., "NormFace: L2 Hypersphere Embedding for Face Verification", ACM MM 2017,
        arXiv:1704.06369 (Eq. 6). Authors' code: https://github.com/happynear/NormFace
    """

    def __init__(self, num_classes: int, s: float = normface.DEFAULT_S,
                 learn_scale: bool = normface.DEFAULT_LEARN_SCALE, scale_min: float | None = normface.DEFAULT_SCALE_MIN,
                 **kwargs):
        owner = type(self).__name__
        params = normface.check_normface_parameters(owner, s)
        super().__init__(num_classes, s=params["s"], **kwargs)
        self.learn_scale = _validation.check_bool(owner, "learn_scale", learn_scale)
        self.scale_min = normface.check_scale_min(owner, scale_min, self.s if self.learn_scale else None)

    def build(self, input_shape):
        super().build(input_shape)
        if self.learn_scale:
            self.scale_weight = self.add_weight(
                name="scale", shape=(), initializer=initializers.Constant(self.s), trainable=True,
                constraint=None if self.scale_min is None else _AtLeast(self.scale_min),
            )

    def scale(self, x=None):
        if not self.learn_scale:
            return self.s
        s = ops.cast(self.scale_weight, "float32")
        return s if self.scale_min is None else ops.maximum(s, self.scale_min)

    def target(self, cos_theta_y):
        return normface_target(cos_theta_y)

    def cosine_loss(self, y_true, cos_theta):
        """Per-sample loss of (labels, cosines) with the head's current (learned) scale: ``HeadLoss`` calls it."""
        return margin_softmax_loss(type(self).__name__, y_true, cos_theta, normface_target, self.scale())

    def make_loss(self):
        if self.learn_scale:
            return losses.HeadLoss(self)
        return losses.NormFaceLoss(s=self.s)

    def get_config(self):
        return {**super().get_config(), "learn_scale": self.learn_scale, "scale_min": self.scale_min}


@_document_head
@keras.saving.register_keras_serializable(package="keras_margin")
class SphereFaceHead(MarginHead):
    """SphereFace A-Softmax head (Liu et al. 2017, arXiv 1704.08063, Eq. 7), the Caffe layer's form.

    Label-aware form (exactly the original ``MarginInnerProduct`` layer):
    ```
    lambda = max(lambda_min, base * (1 + gamma * iteration)^(-power))   (iteration advanced first)
    z_y = |x| * (lambda * cos(theta_y) + psi(theta_y)) / (1 + lambda)
    z_j = |x| * cos(theta_j)                                            (j != y)
    psi(theta) = (-1)^k cos(m theta) - 2k,  k = floor(m theta / pi)
    ```
    ``iteration`` is a non-trainable int32 variable saved with the model; each training call adds 1
    before computing lambda, so the first step uses lambda(1).

    Cosine form: outputs cos(theta); ``loss`` is ``SphereFaceLoss(m, s, lambda_=lambda_min)``, the
    feature-normalized variant with the schedule's final lambda (no |x|, no annealing).

    Args:
        num_classes: Integer, the number of classes, >= 2.
        m: Integer angular margin, 1 to 4. Defaults to `4`.
        base: Float, the schedule's initial lambda scale, > 0. Defaults to `1000.0` (the released
            SphereFace prototxt, as are the next three).
        gamma: Float, the schedule's rate, >= 0. Defaults to `0.12`.
        power: Float, the schedule's exponent, >= 0. Defaults to `1.0`.
        lambda_min: Float, the schedule's floor, >= 0. Defaults to `5.0`.
        s: Float, the scale of the cosine-path loss (the label-aware form scales by |x|), > 0.
            Defaults to `30.0`.
{{head_args}}

{{call_forms}}

    Example:
    >>> import numpy as np, keras
    >>> head = SphereFaceHead(3, kernel_initializer="identity")
    >>> x, y = np.array([[2.0, 0.0, 0.0], [0.0, 1.0, 1.0]], "float32"), np.array([0, 1])
    >>> np.round(keras.ops.convert_to_numpy(head([x, y], training=True)), 3)
    array([[2.   , 0.   , 0.   ],
           [0.   , 0.997, 1.   ]], dtype=float32)
    >>> int(keras.ops.convert_to_numpy(head.iteration))
    1

    Reference:
        Liu et al., "SphereFace: Deep Hypersphere Embedding for Face Recognition", CVPR 2017,
        arXiv:1704.08063 (Eq. 7). Authors' code (the Caffe ``MarginInnerProduct`` layer):
        https://github.com/wy1iu/sphereface
    """

    def __init__(self, num_classes: int, m: int = sphereface.DEFAULT_M, base: float = sphereface.DEFAULT_BASE,
                 gamma: float = sphereface.DEFAULT_GAMMA, power: float = sphereface.DEFAULT_POWER,
                 lambda_min: float = sphereface.DEFAULT_LAMBDA_MIN, s: float = sphereface.DEFAULT_S, **kwargs):
        owner = type(self).__name__
        params = sphereface.check_sphereface_parameters(owner, m, s)
        schedule = sphereface.check_sphereface_schedule(owner, base, gamma, power, lambda_min)
        super().__init__(num_classes, s=params["s"], **kwargs)
        self.m = params["m"]
        self.base, self.gamma = schedule["base"], schedule["gamma"]
        self.power, self.lambda_min = schedule["power"], schedule["lambda_min"]

    def build(self, input_shape):
        super().build(input_shape)
        self.iteration = self.add_weight(
            name="iteration", shape=(), dtype="int32", initializer="zeros", trainable=False
        )

    def current_lambda(self):
        return sphereface_lambda(self.iteration, self.base, self.gamma, self.power, self.lambda_min)

    def scale(self, x):
        x = ops.cast(x, "float32")
        return ops.sqrt(ops.sum(ops.square(x), axis=-1, keepdims=True))

    def target(self, cos_theta_y):
        return sphereface_target(cos_theta_y, self.m, self.current_lambda())

    def training_target(self):
        self.iteration.assign_add(1)
        return self.target

    def make_loss(self):
        return losses.SphereFaceLoss(m=self.m, s=self.s, lambda_=self.lambda_min)

    def get_config(self):
        return {**super().get_config(), "m": self.m, "base": self.base, "gamma": self.gamma,
                "power": self.power, "lambda_min": self.lambda_min}


@_document_head
@keras.saving.register_keras_serializable(package="keras_margin")
class AMSoftmaxHead(MarginHead):
    """AM-Softmax / CosFace head (Wang et al. 2018, arXiv 1801.05599, Eq. 4), optionally as the Caffe layer runs it.

    Formula:
    ```
    z_y = s * (cos(theta_y) - m),  z_j = s * cos(theta_j)  (j != y)
    margin_rule="caffe":  z_y = s * cos(theta_y) where cos(theta_y) <= m     (LabelSpecificAdd)
    margin_schedule:      m = -clip(bias_base + (1 + bias_gamma * it)^bias_power - 1, bias_min, bias_max)
    ```
    ``loss``: ``AMSoftmaxLoss(s, m, margin_rule)``; with a schedule, a ``HeadLoss`` that reads the head's
    current margin.

    The released layer (``LabelSpecificAdd``, happynear/caffe-windows, branch ms) adds ``bias = -m`` to the
    target cosine only where that keeps it positive, with an identity backward pass; ``margin_rule="caffe"``
    reproduces it, the default ``"paper"`` is Eq. 4. Its annealed margin (the repository's
    ``face_train_test_wo_fn.prototxt``: bias_gamma -5e-5, bias_min -0.4, so m grows from 0 to 0.4 over
    8,000 steps) is ``margin_schedule``, a dict of the layer's field names. The counter ``iteration`` is a
    non-trainable int32 variable saved with the model; a training call computes the margin from it FIRST
    and then adds 1 (the layer's order, the opposite of SphereFace's), so the first step uses it = 0. The
    margin in use is kept in the non-trainable variable ``margin`` (the layer's second top). Every training
    path follows the schedule: ``head([x, labels], training=True)`` (dense logits, or the fused, chunked or
    class-sampled loss), and ``head(x, training=True)`` with ``loss=head.loss`` in a Sequential model.

    Args:
        num_classes: Integer, the number of classes, >= 2.
        s: Float, the scale, > 0. Defaults to `30.0`.
        m: Float, the additive cosine margin, in [0, 1]; not used while a `margin_schedule` is set (as the
            layer ignores `bias` when `bias_base` is set). Defaults to `0.35`.
        margin_rule: `"paper"` (the margin everywhere) or `"caffe"` (only where cos(theta_y) > m).
            Defaults to `"paper"`.
        margin_schedule: `None` (a fixed m) or a dict with the Caffe fields `bias_base`, `bias_gamma`,
            `bias_power`, `bias_min`, `bias_max` (missing ones take the proto defaults 0, 0, 1, 0, 0;
            -1 <= bias_min <= bias_max <= 0). Defaults to `None`.
{{head_args}}

{{call_forms}}

    Example:
    >>> import numpy as np, keras
    >>> head = AMSoftmaxHead(3, s=10.0, m=0.35, kernel_initializer="identity")
    >>> x, y = np.array([[2.0, 0.0, 0.0], [0.0, 1.0, 1.0]], "float32"), np.array([0, 1])
    >>> np.round(keras.ops.convert_to_numpy(head([x, y], training=True)), 3)
    array([[6.5  , 0.   , 0.   ],
           [0.   , 3.571, 7.071]], dtype=float32)
    >>> round(float(head.loss(y, head(x))), 4)
    1.7668
    >>> annealed = AMSoftmaxHead(3, margin_rule="caffe", margin_schedule={"bias_gamma": -0.1, "bias_min": -0.35})
    >>> for step in range(3):
    ...     logits = annealed([x, y], training=True)
    >>> state = keras.ops.convert_to_numpy(annealed.margin), keras.ops.convert_to_numpy(annealed.iteration)
    >>> round(float(state[0]), 4), int(state[1])
    (0.2, 3)

    Reference:
        Wang et al., "Additive Margin Softmax for Face Verification", IEEE SPL 2018, arXiv:1801.05599
        (Eq. 4). Authors' code: https://github.com/happynear/AMSoftmax. The same objective is CosFace's
        large margin cosine loss (Wang et al., CVPR 2018, arXiv:1801.09414, Eq. 4).
    """

    def __init__(self, num_classes: int, s: float = amsoftmax.DEFAULT_S, m: float = amsoftmax.DEFAULT_M,
                 margin_rule: str = amsoftmax.DEFAULT_MARGIN_RULE, margin_schedule: dict | None = None, **kwargs):
        owner = type(self).__name__
        params = amsoftmax.check_amsoftmax_parameters(owner, s, m, margin_rule)
        super().__init__(num_classes, s=params["s"], **kwargs)
        self.m, self.margin_rule = params["m"], params["margin_rule"]
        self.margin_schedule = amsoftmax.check_margin_schedule(owner, margin_schedule)

    def build(self, input_shape):
        super().build(input_shape)
        if self.margin_schedule is not None:
            self.iteration = self.add_weight(
                name="iteration", shape=(), dtype="int32", initializer="zeros", trainable=False
            )
            start = float(keras.ops.convert_to_numpy(amsoftmax.scheduled_margin(0, **self.margin_schedule)))
            self.margin = self.add_weight(
                name="margin", shape=(), dtype="float32", initializer=initializers.Constant(start), trainable=False
            )

    def current_margin(self):
        """The margin the objective uses now: m, or the schedule's latest value (the ``margin`` variable)."""
        return self.m if self.margin_schedule is None else ops.cast(self.margin, "float32")

    def target(self, cos_theta_y):
        return amsoftmax_target(cos_theta_y, self.current_margin(), self.margin_rule)

    def advance_schedule(self):
        """One training step of the schedule: the margin from the counter as it is, then the counter + 1."""
        margin = amsoftmax.scheduled_margin(self.iteration, **self.margin_schedule)
        self.margin.assign(margin)
        self.iteration.assign_add(1)
        return margin

    def training_target(self):
        if self.margin_schedule is None:
            return self.target
        margin = self.advance_schedule()
        return lambda cos_theta_y: amsoftmax_target(cos_theta_y, margin, self.margin_rule)

    def call(self, inputs, training=None):
        # The cosine form in training (Sequential + head.loss) advances the schedule; the loss reads `margin`.
        if training and self.margin_schedule is not None and not isinstance(inputs, (list, tuple)):
            self.advance_schedule()
        return super().call(inputs, training=training)

    def cosine_loss(self, y_true, cos_theta):
        """Per-sample loss of (labels, cosines) with the head's current margin: ``HeadLoss`` calls it."""
        return margin_softmax_loss(type(self).__name__, y_true, cos_theta, self.target, self.s)

    def make_loss(self):
        if self.margin_schedule is not None:
            return losses.HeadLoss(self)
        return losses.AMSoftmaxLoss(s=self.s, m=self.m, margin_rule=self.margin_rule)

    def get_config(self):
        return {**super().get_config(), "m": self.m, "margin_rule": self.margin_rule,
                "margin_schedule": self.margin_schedule}


@_document_head
@keras.saving.register_keras_serializable(package="keras_margin")
class X2SoftmaxHead(MarginHead):
    """X2-Softmax head (Xu et al. 2023, arXiv 2312.05281, Eq. 8).

    Formula:
    ```
    z_y = s * (a * (theta_y - h)^2 + k),  z_j = s * cos(theta_j)  (j != y)
    ```
    ``loss``: ``X2SoftmaxLoss(s, a, h, k, straight_through)``.

    Args:
        num_classes: Integer, the number of classes, >= 2.
        s: Float, the scale, > 0. Defaults to `64.0` (the authors' released training command, as are
            the next three).
        a: Float, the curvature of the parabola, < 0. Defaults to `-0.9`.
        h: Float, the vertex angle in radians, in [0, pi). Defaults to `0.0`.
        k: Float, the vertex value, in [-1, 1]. Defaults to `0.65`.
        straight_through: Boolean; identity gradient through the margin, as in the authors' code.
            Defaults to `False`.
{{head_args}}

{{call_forms}}

    Example:
    >>> import numpy as np, keras
    >>> head = X2SoftmaxHead(3, s=10.0, kernel_initializer="identity")
    >>> x, y = np.array([[2.0, 0.0, 0.0], [0.0, 1.0, 1.0]], "float32"), np.array([0, 1])
    >>> np.round(keras.ops.convert_to_numpy(head([x, y], training=True)), 3)
    array([[6.5  , 0.   , 0.   ],
           [0.   , 0.948, 7.071]], dtype=float32)

    Reference:
        Xu et al., "X2-Softmax: Margin Adaptive Loss Function for Face Recognition", arXiv:2312.05281
        (Eq. 8).
    """

    def __init__(self, num_classes: int, s: float = x2softmax.DEFAULT_S, a: float = x2softmax.DEFAULT_A,
                 h: float = x2softmax.DEFAULT_H, k: float = x2softmax.DEFAULT_K,
                 straight_through: bool = x2softmax.DEFAULT_STRAIGHT_THROUGH, **kwargs):
        params = x2softmax.check_x2softmax_parameters(type(self).__name__, s, a, h, k, straight_through)
        super().__init__(num_classes, s=params["s"], **kwargs)
        self.a, self.h, self.k = params["a"], params["h"], params["k"]
        self.straight_through = params["straight_through"]

    def target(self, cos_theta_y):
        return x2softmax_target(cos_theta_y, self.a, self.h, self.k, self.straight_through)

    def make_loss(self):
        return losses.X2SoftmaxLoss(s=self.s, a=self.a, h=self.h, k=self.k, straight_through=self.straight_through)

    def get_config(self):
        return {**super().get_config(), "a": self.a, "h": self.h, "k": self.k,
                "straight_through": self.straight_through}


@_document_head
@keras.saving.register_keras_serializable(package="keras_margin")
class ArcFaceHead(MarginHead):
    """ArcFace head (Deng et al. 2019, arXiv 1801.07698, Eq. 3), InsightFace's monotone fallback.

    Formula:
    ```
    z_y = s * cos(theta_y + m)  while theta_y + m <= pi, else s * (cos(theta_y) - m sin(m))
    z_j = s * cos(theta_j)      (j != y)
    ```
    ``loss``: ``ArcFaceLoss(s, m)``.

    Args:
        num_classes: Integer, the number of classes, >= 2.
        s: Float, the scale, > 0. Defaults to `64.0`.
        m: Float, the additive angular margin in radians, in [0, pi). Defaults to `0.5`.
{{head_args}}

{{call_forms}}

    Example:
    >>> import numpy as np, keras
    >>> head = ArcFaceHead(3, s=10.0, m=0.5, kernel_initializer="identity")
    >>> x, y = np.array([[2.0, 0.0, 0.0], [0.0, 1.0, 1.0]], "float32"), np.array([0, 1])
    >>> np.round(keras.ops.convert_to_numpy(head([x, y], training=True)), 3)
    array([[8.773, 0.   , 0.   ],
           [0.   , 2.815, 7.071]], dtype=float32)

    Reference:
        Deng et al., "ArcFace: Additive Angular Margin Loss for Deep Face Recognition", CVPR 2019,
        arXiv:1801.07698 (Eq. 3). Authors' code: https://github.com/deepinsight/insightface
        (`recognition/arcface_torch/losses.py`).
    """

    def __init__(self, num_classes: int, s: float = arcface.DEFAULT_S, m: float = arcface.DEFAULT_M, **kwargs):
        params = arcface.check_arcface_parameters(type(self).__name__, s, m)
        super().__init__(num_classes, s=params["s"], **kwargs)
        self.m = params["m"]

    def target(self, cos_theta_y):
        return arcface_target(cos_theta_y, self.m)

    def make_loss(self):
        return losses.ArcFaceLoss(s=self.s, m=self.m)

    def get_config(self):
        return {**super().get_config(), "m": self.m}


@_document_head
@keras.saving.register_keras_serializable(package="keras_margin")
class CombinedMarginHead(MarginHead):
    """InsightFace's combined margin head (ArcFace paper, arXiv 1801.07698, Eq. 4), with a monotone fallback.

    Formula:
    ```
    z_y = s * (cos(m1 * theta_y + m2) - m3)   while m1 * theta_y + m2 <= pi, else a monotone fallback
    z_j = s * cos(theta_j)                    (j != y)
    ```
    ``loss``: ``CombinedMarginLoss(s, m1, m2, m3)``; ``keras_margin.margins.combined_margin_target``
    states the fallback. (1, 0, 0) is NormFace, (1, 0, m) AM-Softmax, (1, m, 0) ArcFace.

    Args:
        num_classes: Integer, the number of classes, >= 2.
        s: Float, the scale, > 0. Defaults to `64.0`.
        m1: Float, the multiplicative angular margin, > 0. Defaults to `1.0`.
        m2: Float, the additive angular margin in radians, in [0, pi). Defaults to `0.5`.
        m3: Float, the additive cosine margin, in [0, 1]. Defaults to `0.0`.
{{head_args}}

{{call_forms}}

    Example:
    >>> import numpy as np, keras
    >>> head = CombinedMarginHead(3, s=10.0, m1=1.0, m2=0.3, m3=0.2, kernel_initializer="identity")
    >>> x, y = np.array([[2.0, 0.0, 0.0], [0.0, 1.0, 1.0]], "float32"), np.array([0, 1])
    >>> np.round(keras.ops.convert_to_numpy(head([x, y], training=True)), 3)
    array([[7.552, 0.   , 0.   ],
           [0.   , 2.666, 7.071]], dtype=float32)

    Reference:
        Deng et al., "ArcFace: Additive Angular Margin Loss for Deep Face Recognition", CVPR 2019,
        arXiv:1801.07698 (Eq. 4). Authors' code: https://github.com/deepinsight/insightface
        (`recognition/arcface_torch/losses.py`, `CombinedMarginLoss`).
    """

    def __init__(self, num_classes: int, s: float = arcface.COMBINED_DEFAULT_S, m1: float = arcface.COMBINED_DEFAULT_M1,
                 m2: float = arcface.COMBINED_DEFAULT_M2, m3: float = arcface.COMBINED_DEFAULT_M3, **kwargs):
        params = arcface.check_combined_margin_parameters(type(self).__name__, s, m1, m2, m3)
        super().__init__(num_classes, s=params["s"], **kwargs)
        self.m1, self.m2, self.m3 = params["m1"], params["m2"], params["m3"]

    def target(self, cos_theta_y):
        return combined_margin_target(cos_theta_y, self.m1, self.m2, self.m3)

    def make_loss(self):
        return losses.CombinedMarginLoss(s=self.s, m1=self.m1, m2=self.m2, m3=self.m3)

    def get_config(self):
        return {**super().get_config(), "m1": self.m1, "m2": self.m2, "m3": self.m3}


@_document_head
@keras.saving.register_keras_serializable(package="keras_margin")
class SubCenterArcFaceHead(ArcFaceHead):
    """Sub-center ArcFace head (Deng et al. 2020, ECCV, "Sub-center ArcFace"): k sub-centers per class.

    Formula:
    ```
    cos(theta_j) = max_{c < k} <x / |x|, W[:, j*k + c] / |W[:, j*k + c]|>     (kernel (d, num_classes * k))
    z_y = s * cos(theta_y + m)   (ArcFace's target, with its monotone fallback)
    z_j = s * cos(theta_j)       (j != y)
    ```
    Column ``j * k + c`` is sub-center ``c`` of class ``j`` (InsightFace's layout: a (C*k)-way FC reshaped to
    (C, k) and max-pooled). ``head(x)`` returns the max-pooled (batch, num_classes) cosines, so ``loss`` is
    ``ArcFaceLoss(s, m)``. After training, ``dominant_kernel(x, labels)`` keeps each class's dominant
    sub-center (the one most of the class's samples are closest to; paper Sec. 3.2) and returns a
    (d, num_classes) kernel for an ``ArcFaceHead`` (``to_arcface_head`` builds one).

    Paths: dense, ``fused_loss=True`` (unchunked). ``chunk_size`` and ``sample_rate`` raise a ValueError:
    the fused chunked/sampled loss (``keras_margin.chunked``) takes one kernel column per class and has no
    max-pooling over sub-centers.

    Args:
        num_classes: Integer, the number of classes, >= 2.
        k: Integer, the number of sub-centers per class, >= 1. Defaults to `3` (the paper's).
        s: Float, the scale, > 0. Defaults to `64.0`.
        m: Float, the additive angular margin in radians, in [0, pi). Defaults to `0.5`.
{{head_args}}

{{call_forms}}

    Example:
    >>> import numpy as np, keras
    >>> head = SubCenterArcFaceHead(2, k=2, s=10.0, m=0.5)
    >>> _ = head(np.zeros((1, 2), "float32"))
    >>> _ = head.kernel.assign(np.array([[1.0, 0.0, 0.0, -1.0], [0.0, 1.0, 1.0, 0.0]], "float32"))
    >>> x = np.array([[0.0, 2.0]], "float32")  # class 0's second sub-center, class 1's first
    >>> np.round(keras.ops.convert_to_numpy(head(x)), 3)
    array([[1., 1.]], dtype=float32)
    >>> head.dominant_kernel(np.array([[0.0, 1.0], [0.0, 1.0], [-1.0, 0.0]], "float32"), np.array([0, 0, 1]))
    array([[ 0., -1.],
           [ 1.,  0.]], dtype=float32)

    Reference:
        Deng et al., "Sub-center ArcFace: Boosting Face Recognition by Large-Scale Noisy Web Faces", ECCV 2020
        (Sec. 3.1-3.2, k = 3, s = 64, m = 0.5). Authors' code: https://github.com/deepinsight/insightface
        (the sub-center option of `recognition/arcface_mxnet`).
    """

    _classes_last_only = ("the k sub-centers of a class are adjacent columns of the (embedding_dim, num_classes * k) "
                          "kernel.")

    def __init__(self, num_classes: int, k: int = 3, s: float = arcface.DEFAULT_S, m: float = arcface.DEFAULT_M,
                 **kwargs):
        owner = type(self).__name__
        self.k = _validation.check_count(owner, "k", k, minimum=1)
        if kwargs.get("chunk_size") is not None or float(kwargs.get("sample_rate", 1.0)) < 1.0:
            raise ValueError(
                f"{owner}: `chunk_size` and `sample_rate` are not supported: the chunked and class-sampled "
                "fused losses take one kernel column per class and cannot max-pool over the k sub-centers; use "
                "fused_loss=True alone, or train with k sub-centers and then to_arcface_head()."
            )
        super().__init__(num_classes, s=s, m=m, **kwargs)

    def build(self, input_shape):
        shape = self._embedding_shape(input_shape)
        if len(shape) != 2 or shape[-1] is None:
            raise ValueError(
                f"{type(self).__name__}: embeddings must have shape (batch, embedding_dim) with a known "
                f"embedding_dim; got shape {shape}. Add keras.layers.Flatten() or a pooling layer first."
            )
        self.kernel = self.add_weight(
            name="kernel", shape=(shape[-1], self.units * self.k), initializer=self.kernel_initializer,
            regularizer=self.kernel_regularizer, constraint=self.kernel_constraint,
        )

    def subcenter_cosines(self, x):
        """cos(theta) to every sub-center, (batch, num_classes, k) float32."""
        _validation.check_embeddings(type(self).__name__, x, self.kernel.shape[0])
        cos = cosine_matrix(x, self.kernel, self.compute_dtype)
        return ops.reshape(cos, (-1, self.units, self.k))

    def cosine(self, x):
        cos = self.subcenter_cosines(x)
        return cos[:, :, 0] if self.k == 1 else ops.max(cos, axis=-1)

    def per_sample_loss(self, x, class_ids, training: bool = False):
        """Per-sample loss (batch,) on the max-pooled cosines (the unchunked fused path)."""
        target = self.training_target() if training else (lambda c: c)
        return margin_cross_entropy(self.cosine(x), ops.cast(class_ids, "int32"), target, self.scale(x))

    def dominant_kernel(self, embeddings, labels) -> np.ndarray:
        """(d, num_classes) kernel of each class's dominant sub-center, from training embeddings and labels.

        For each sample, its class's closest sub-center gets a vote; the sub-center with most votes is kept
        (ties: the lowest index; a class without samples keeps sub-center 0).
        """
        if not self.built:
            raise ValueError(f"{type(self).__name__}: dominant_kernel needs a built head (call it once first).")
        cos = ops.convert_to_numpy(self.subcenter_cosines(embeddings))
        ids = np.asarray(ops.convert_to_numpy(labels)).reshape(-1).astype("int64")
        if ids.shape[0] != cos.shape[0] or ids.min(initial=0) < 0 or ids.max(initial=0) >= self.units:
            raise ValueError(f"{type(self).__name__}: `labels` must be {cos.shape[0]} class ids in "
                             f"[0, {self.units}); got shape {ids.shape}.")
        closest = np.argmax(cos[np.arange(ids.shape[0]), ids], axis=-1)
        votes = np.zeros((self.units, self.k), "int64")
        np.add.at(votes, (ids, closest), 1)
        dominant = np.argmax(votes, axis=-1)
        kernel = ops.convert_to_numpy(self.kernel).reshape(-1, self.units, self.k)
        return np.ascontiguousarray(kernel[:, np.arange(self.units), dominant]).astype("float32")

    def to_arcface_head(self, embeddings, labels) -> ArcFaceHead:
        """A built ``ArcFaceHead(num_classes, s, m)`` whose kernel is ``dominant_kernel(embeddings, labels)``."""
        kernel = self.dominant_kernel(embeddings, labels)
        head = ArcFaceHead(self.units, s=self.s, m=self.m)
        head.build((None, kernel.shape[0]))
        head.kernel.assign(kernel)
        return head

    def get_config(self):
        return {**super().get_config(), "k": self.k}


@_document_head
@keras.saving.register_keras_serializable(package="keras_margin")
class NormFaceContrastiveHead(NormFaceHead):
    """NormFace's best objective (Wang et al. 2017, Sec. 4-5): normalized softmax + weighted C-contrastive.

    Formula:
    ```
    cos_ij = <x~_i, W~_j>,  a_ij = <x~_i, A~_j>          W: `kernel`, A: `agents`, both (embedding_dim, C)
    loss_i = CE(s * cos_i, y_i) + agent_weight * C-contrastive(a_i, y_i)
    C-contrastive(a, y) = D_y + sum_{j != y} max(0, margin - D_j),   D = 2 - 2 a
    ```
    As in the released ``combine_softmax_contrastive.prototxt`` (LFW 99.2167 %, the paper's best): two
    SEPARATE class matrices (the softmax weights and the agents), a learned scale s (initial 4), loss weight
    0.01 and margin 1 on the contrastive term.

    The contrastive term needs the labels, so the head is used in its label-aware form (a functional model
    with the labels as a second input); a Sequential model cannot pass labels to a layer.
    - ``head([x, labels])``: the softmax logits ``s * cos`` (compile with
      ``keras.losses.SparseCategoricalCrossentropy(from_logits=True)``); the head adds the batch mean of
      ``agent_weight * C-contrastive`` with ``add_loss`` (sample weights do not apply to it). NormFace has no
      margin, so ``training`` changes nothing.
    - With ``fused_loss=True``: the per-sample total loss (softmax term + weighted contrastive term), its
      batch mean added with ``add_loss``; compile with ``loss=None``.
    - ``head(x)``: the softmax matrix's cosines, for inference and accuracy (argmax).

    Args:
        num_classes: Integer, the number of classes, >= 2.
        s: Float, the initial (or fixed) scale, > 0. Defaults to `4.0` (the released config).
        learn_scale: Boolean; learn s. Defaults to `True` (the released config).
        scale_min: Float > 0 or `None`; the floor of a learned s. Defaults to `0.01` (the released
            combined config sets none; pass `None` to match it exactly).
        margin: Float in [0, 4], the C-contrastive margin on squared distances. Defaults to `1.0`.
        agent_weight: Float >= 0, the contrastive term's loss weight. Defaults to `0.01`.
        agent_initializer: Initializer of the agents `(embedding_dim, num_classes)`. Defaults to
            `"random_normal"` (isotropic directions, as the config's `gaussian_unitball`).
        fused_loss: Boolean, see above. Defaults to `False`. (`chunk_size` and `sample_rate` are not
            supported by this head.)
{{kernel_args}}
        **kwargs: Base layer keyword arguments, such as `name` and `dtype`.

    Example:
    >>> import numpy as np, keras
    >>> embeddings, labels = keras.Input((8,)), keras.Input((), dtype="int32")
    >>> head = NormFaceContrastiveHead(5)
    >>> model = keras.Model([embeddings, labels], head([embeddings, labels]))
    >>> model.compile("adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    ...               jit_compile=True)
    >>> x, y = np.random.rand(16, 8).astype("float32"), np.arange(16) % 5
    >>> history = model.fit([x, y], y, epochs=1, verbose=0)
    >>> bool(np.isfinite(history.history["loss"][0]))
    True

    Reference:
        Wang et al., "NormFace: L2 Hypersphere Embedding for Face Verification", ACM MM 2017,
        arXiv:1704.06369 (Sec. 4, Table 2). Authors' config: https://github.com/happynear/NormFace
        (`prototxt/combine_softmax_contrastive.prototxt`).
    """

    def __init__(self, num_classes: int, s: float = 4.0, learn_scale: bool = True,
                 scale_min: float | None = normface.DEFAULT_SCALE_MIN,
                 margin: float = normface_agents.C_CONTRASTIVE_MARGIN, agent_weight: float = 0.01,
                 agent_initializer="random_normal", **kwargs):
        owner = type(self).__name__
        if kwargs.get("chunk_size") is not None or kwargs.get("sample_rate", 1.0) != 1.0:
            raise ValueError(f"{owner}: `chunk_size` and `sample_rate` are not supported (the contrastive term "
                             "sums over every class); use NormFaceHead for a chunked or class-sampled loss.")
        super().__init__(num_classes, s=s, learn_scale=learn_scale, scale_min=scale_min, **kwargs)
        self.margin = normface_agents.check_c_contrastive_parameters(owner, margin)["margin"]
        self.agent_weight = _validation.check_number(owner, "agent_weight", agent_weight, low=0.0)
        self.agent_initializer = initializers.get(agent_initializer)

    def build(self, input_shape):
        super().build(input_shape)
        self.agents = self.add_weight(name="agents", shape=self.kernel.shape, initializer=self.agent_initializer)

    def agent_cosines(self, x):
        """cos between each embedding and each agent, (batch, num_classes) float32."""
        return cosine_matrix(x, self.agents, self.compute_dtype, self.classes_first)

    def call(self, inputs, training=None):
        if not isinstance(inputs, (list, tuple)):
            return self.cosine(inputs)
        if len(inputs) != 2:
            raise ValueError(f"{type(self).__name__}: expected embeddings or [embeddings, labels]; got "
                             f"{len(inputs)} inputs.")
        x, labels = inputs
        cos_theta = self.cosine(x)
        class_ids = sparse_labels(type(self).__name__, labels, self.units, batch=x.shape[0])
        contrastive = self.agent_weight * normface_agents.c_contrastive(self.agent_cosines(x), class_ids,
                                                                        self.margin)
        if self.fused_loss:
            per_sample = margin_cross_entropy(cos_theta, class_ids, normface_target, self.scale()) + contrastive
            self.add_loss(ops.mean(per_sample))
            return per_sample
        self.add_loss(ops.mean(contrastive))
        return margin_logits(cos_theta, class_ids, normface_target, self.scale())

    def make_loss(self):
        raise ValueError(
            f"{type(self).__name__}: the C-contrastive term needs the labels, which a cosine-path loss given to "
            "compile() cannot pass to the head. Build a functional model on [embeddings, labels] and call "
            "head([embeddings, labels]) (see the class docstring)."
        )

    def get_config(self):
        config = super().get_config()
        for key in ("chunk_size", "sample_rate", "sample_update"):
            config.pop(key)
        return {**config, "margin": self.margin, "agent_weight": self.agent_weight,
                "agent_initializer": initializers.serialize(self.agent_initializer)}


_STATEFUL_CALL_FORMS = """\
    Call arguments:
        inputs: The embeddings `x` alone, or the list `[x, labels]` with labels as integer class ids
            `(batch,)` / `(batch, 1)` or one-hot `(batch, num_classes)`.
        training: Boolean; with `[x, labels]`, whether to apply the objective and update its statistic.
            Defaults to `None` (neither).

    Call forms (the statistic needs the labels, so training goes through `head([x, labels])`):
        - `head(x)`: cos(theta), for inference and accuracy.
        - `head([x, labels], training=True)`: the objective's logits (the statistic updated first), for
          `keras.losses.SparseCategoricalCrossentropy(from_logits=True)`; `training` False or `None` gives
          `scale * cos(theta)` with the statistic as it is.
        - With `fused_loss=True`, `head([x, labels], training=...)`: the per-sample loss `(batch,)`, its mean
          also added with `add_loss` (compile with `loss=None`).

    Input shape:
        `(batch_size, embedding_dim)`, or `[(batch_size, embedding_dim), (batch_size,)]`.

    Output shape:
        `(batch_size, num_classes)` float32 cosines or logits; `(batch_size,)` with `fused_loss=True`."""


def _stateful_call_forms(cls):
    """Fill a batch-statistic head's ``{{stateful_call_forms}}`` placeholder (before ``_document_head``)."""
    cls.__doc__ = cls.__doc__.replace("{{stateful_call_forms}}", _STATEFUL_CALL_FORMS)
    return cls


class _BatchStatisticHead(MarginHead):
    """The call path of a head whose objective reads a statistic of the training batch kept in non-trainable
    weights (saved in ``.keras`` files): ``objective(cos_theta, class_ids, training, x)`` updates the statistic
    (training calls only) and returns ``(target, nontarget, scale)`` for ``core.margin_logits`` /
    ``core.margin_cross_entropy``. The chunked fused loss is not available (``keras_margin.chunked`` has no
    non-target hook); the class-sampled one is where the objective allows it (``_SAMPLING``)."""

    _SAMPLING = False
    _UNSUPPORTED = ""

    def __init__(self, num_classes: int, s, **kwargs):
        owner = type(self).__name__
        if kwargs.get("chunk_size") is not None or (not self._SAMPLING and float(kwargs.get("sample_rate", 1.0)) < 1.0):
            raise ValueError(f"{owner}: {self._UNSUPPORTED}")
        super().__init__(num_classes, s=s, **kwargs)

    def objective(self, cos_theta, class_ids, training: bool, x):
        raise NotImplementedError

    def label_logits(self, cos_theta, class_ids, training: bool, x):
        target, nontarget, scale = self.objective(cos_theta, class_ids, training, x)
        return margin_logits(cos_theta, class_ids, target, scale, nontarget=nontarget)

    def per_sample_loss(self, x, class_ids, training: bool = False):
        """Per-sample loss (batch,) of embeddings and int32 class ids (unchunked; class-sampled if allowed)."""
        kernel, class_ids = self.step_kernel(x, class_ids, training)
        _validation.check_embeddings(type(self).__name__, x, self.embedding_dim)
        cos_theta = cosine_matrix(x, kernel, self.compute_dtype, self.classes_first)
        target, nontarget, scale = self.objective(cos_theta, class_ids, training, x)
        return margin_cross_entropy(cos_theta, class_ids, target, scale, nontarget=nontarget)

    def _no_cosine_loss(self, statistic: str):
        return ValueError(
            f"{type(self).__name__}: its {statistic} is a statistic of each training batch's target cosines, which "
            "a cosine-path loss given to compile() cannot update (on JAX, variables a loss assigns are dropped). "
            "Build a functional model on [embeddings, labels] and call head([embeddings, labels], training=True) "
            "(see the class docstring)."
        )


@_document_head
@_stateful_call_forms
@keras.saving.register_keras_serializable(package="keras_margin")
class CurricularFaceHead(_BatchStatisticHead):
    """CurricularFace head (Huang et al. 2020, CVPR, arXiv 2004.00288), as the authors' code runs it.

    Formula (one training call; t is the non-trainable weight `t`, initially 0):
    ```
    t <- momentum * mean_i(cos(theta_{y_i})) + (1 - momentum) * t        (first; no gradient)
    z_y = s * T(cos(theta_y)),  T = ArcFace's cos(theta_y + m), with its fallback cos(theta_y) - m sin(m)
                                    where theta_y > pi - m
    z_j = s * cos(theta_j) * (t + cos(theta_j))   if cos(theta_j) > cos(theta_y + m)   (a hard negative)
        = s * cos(theta_j)                        otherwise                            (j != y)
    ```
    Where the code and the paper differ, the head follows the code (``head/metrics.py``): t is updated in
    every training call BEFORE the hard negatives are re-weighted, with weight 0.01 on the batch mean
    (``momentum``); the hard-negative test uses the plain ``cos(theta_y + m)``, not the fallback. Calls with
    ``training`` False or None leave t as it is and give ``s * cos(theta)`` (the code has no such mode:
    it always applies the objective). ``head.loss`` raises: t needs the labels in the forward pass.

    Paths: dense logits, ``fused_loss=True`` (unchunked) and ``sample_rate`` < 1 (Partial FC: t reads only
    the targets, which are always sampled; hard negatives are those among the sampled classes).
    ``chunk_size`` raises a ValueError (``keras_margin.chunked`` has no non-target hook).

    Args:
        num_classes: Integer, the number of classes, >= 2.
        s: Float, the scale, > 0. Defaults to `64.0`.
        m: Float, the additive angular margin in radians, in [0, pi). Defaults to `0.5`.
        momentum: Float in (0, 1], the batch mean's weight in t's moving average. Defaults to `0.01`
            (the authors' code).
{{head_args}}

{{stateful_call_forms}}

    Example:
    >>> import numpy as np, keras
    >>> head = CurricularFaceHead(3, s=10.0, m=0.5, kernel_initializer="identity")
    >>> x, y = np.array([[2.0, 0.0, 0.0], [0.0, 1.0, 1.0]], "float32"), np.array([0, 1])
    >>> np.round(keras.ops.convert_to_numpy(head([x, y], training=True)), 3)
    array([[8.773, 0.   , 0.   ],
           [0.   , 2.815, 5.06 ]], dtype=float32)
    >>> round(float(keras.ops.convert_to_numpy(head.t)), 5)  # 0.01 * mean(1, 0.7071)
    0.00854

    Reference:
        Huang et al., "CurricularFace: Adaptive Curriculum Learning Loss for Deep Face Recognition", CVPR 2020,
        arXiv:2004.00288 (Sec. 3). Authors' code: https://github.com/HuangYG123/CurricularFace
        (`head/metrics.py`, `CurricularFace`).
    """

    _SAMPLING = True
    _UNSUPPORTED = ("`chunk_size` is not supported: the chunked fused loss (keras_margin.chunked) has no hook for "
                    "the re-weighted hard negatives; use fused_loss=True alone or with sample_rate.")

    def __init__(self, num_classes: int, s: float = curricularface.DEFAULT_S, m: float = curricularface.DEFAULT_M,
                 momentum: float = curricularface.DEFAULT_MOMENTUM, **kwargs):
        params = curricularface.check_curricularface_parameters(type(self).__name__, s, m, momentum)
        super().__init__(num_classes, s=params["s"], **kwargs)
        self.m, self.momentum = params["m"], params["momentum"]

    def build(self, input_shape):
        super().build(input_shape)
        self.t = self.add_weight(name="t", shape=(), dtype="float32",
                                 initializer=initializers.Constant(curricularface.DEFAULT_T), trainable=False)

    def target(self, cos_theta_y):
        return curricularface.curricularface_target(cos_theta_y, self.m)

    def objective(self, cos_theta, class_ids, training: bool, x=None):
        if not training:
            return normface_target, None, self.s
        t = curricularface.curricularface_t(ops.cast(self.t, "float32"), target_cosines(cos_theta, class_ids),
                                            self.momentum)
        self.t.assign(t)
        return self.target, lambda cos, cos_y: curricularface.curricularface_nontarget(cos, cos_y, t, self.m), self.s

    def make_loss(self):
        raise self._no_cosine_loss("curriculum parameter t")

    def get_config(self):
        return {**super().get_config(), "m": self.m, "momentum": self.momentum}


@_document_head
@_stateful_call_forms
@keras.saving.register_keras_serializable(package="keras_margin")
class AdaCosHead(_BatchStatisticHead):
    """AdaCos head (Zhang et al. 2019, CVPR, arXiv 1905.00292): no margin, an adaptive scale.

    Formula (one training call; s is the non-trainable weight `s`, initially sqrt(2) * log(C - 1)):
    ```
    B_avg = (1 / N) sum_i sum_{j != y_i} exp(s * cos(theta_ij))          (the previous s; no gradient)
    s <- log(B_avg) / cos(min(pi / 4, median_i theta_{i, y_i}))
    z_j = s * cos(theta_j)   for all j (the new s)
    ```
    ``adaptive=False`` is the paper's fixed AdaCos: ``s = sqrt(2) * log(C - 1)`` throughout (then ``head.loss``
    is ``NormFaceLoss(s)``). With ``adaptive=True`` ``head.loss`` raises: the update needs the labels.

    The reference code (4uiiurz1/pytorch-adacos ``metrics.py``, a widely used independent implementation, not
    the authors') matches the paper's dynamic scale except: ``torch.median`` returns the LOWER of the two middle
    angles of an even batch (``median="lower"``; the default ``"midpoint"`` is the usual median, their mean),
    and it updates s in every call that has labels, evaluation included (the head only in training calls). The
    statistic sums over every class of the batch, so ``chunk_size`` and ``sample_rate`` raise a ValueError (a
    class-sampled B_avg is another statistic; a chunked one needs a second pass over the classes, which
    ``keras_margin.chunked`` does not make).

    Args:
        num_classes: Integer, the number of classes, >= 3 (the fixed scale is 0 for 2).
        s: Float > 0 or `None`, the initial (or fixed) scale. Defaults to `None`: sqrt(2) * log(num_classes - 1).
        median: `"midpoint"` or `"lower"` (the reference code's `torch.median`). Defaults to `"midpoint"`.
        adaptive: Boolean; update s in each training call. Defaults to `True`.
        fused_loss: Boolean. When True, `head([x, labels], training=...)` returns the per-sample loss
            `(batch,)` and adds its batch mean with `add_loss` (compile with `loss=None`). Defaults to `False`.
{{kernel_args}}
        **kwargs: Base layer keyword arguments, such as `name` and `dtype`.

{{stateful_call_forms}}

    Example:
    >>> import numpy as np, keras
    >>> head = AdaCosHead(3, kernel_initializer="identity")
    >>> x, y = np.array([[2.0, 0.0, 0.0], [0.0, 1.0, 1.0]], "float32"), np.array([0, 1])
    >>> round(head.s, 4)  # sqrt(2) * log(2), the initial s
    0.9803
    >>> np.round(keras.ops.convert_to_numpy(head([x, y], training=True)), 3)
    array([[0.992, 0.   , 0.   ],
           [0.   , 0.701, 0.701]], dtype=float32)
    >>> round(float(keras.ops.convert_to_numpy(head.adaptive_scale)), 4)  # log(2.5) / cos(pi / 8)
    0.9919

    Reference:
        Zhang et al., "AdaCos: Adaptively Scaling Cosine Logits for Effectively Learning Deep Face
        Representations", CVPR 2019, arXiv:1905.00292 (the fixed and the dynamic scale). Reference code:
        https://github.com/4uiiurz1/pytorch-adacos (`metrics.py`, `AdaCos`).
    """

    _UNSUPPORTED = ("`chunk_size` and `sample_rate` are not supported: the adaptive scale's B_avg sums exp(s cos) "
                    "over every class of the batch; use fused_loss=True alone.")

    def __init__(self, num_classes: int, s: float | None = None, median: str = adacos.DEFAULT_MEDIAN,
                 adaptive: bool = adacos.DEFAULT_ADAPTIVE, **kwargs):
        params = adacos.check_adacos_parameters(type(self).__name__, num_classes, s, median, adaptive)
        super().__init__(num_classes, s=params["s"], **kwargs)
        self.median, self.adaptive = params["median"], params["adaptive"]

    def build(self, input_shape):
        super().build(input_shape)
        if self.adaptive:
            self.adaptive_scale = self.add_weight(name="s", shape=(), dtype="float32",
                                                  initializer=initializers.Constant(self.s), trainable=False)

    def scale(self, x=None):
        return ops.cast(self.adaptive_scale, "float32") if self.adaptive else self.s

    def target(self, cos_theta_y):
        return normface_target(cos_theta_y)

    def objective(self, cos_theta, class_ids, training: bool, x=None):
        if not (training and self.adaptive):
            return normface_target, None, self.scale()
        is_target = ops.equal(ops.arange(self.units, dtype="int32")[None, :], class_ids[:, None])
        s = adacos.adacos_scale(cos_theta, is_target, self.scale(), self.median,
                                cos_theta_y=target_cosines(cos_theta, class_ids))
        self.adaptive_scale.assign(s)
        return normface_target, None, s

    def make_loss(self):
        if self.adaptive:
            raise self._no_cosine_loss("adaptive scale s")
        return losses.NormFaceLoss(s=self.s)

    def get_config(self):
        config = super().get_config()
        for key in ("chunk_size", "sample_rate", "sample_update"):
            config.pop(key)
        return {**config, "median": self.median, "adaptive": self.adaptive}


@_document_head
@_stateful_call_forms
@keras.saving.register_keras_serializable(package="keras_margin")
class AdaFaceHead(_BatchStatisticHead):
    """AdaFace head (Kim et al. 2022, CVPR, arXiv 2204.00964), as the authors' ``head.py`` runs it.

    Formula (one training call; batch_mean, batch_std: non-trainable weights, initially 20 and 100):
    ```
    n_i = clip(|x_i|, 0.001, 100)                                              (no gradient)
    batch_mean <- t_alpha * mean(n) + (1 - t_alpha) * batch_mean               (first)
    batch_std  <- t_alpha * std(n)  + (1 - t_alpha) * batch_std                (unbiased std)
    z_i = clip(h * (n_i - batch_mean) / (batch_std + eps), -1, 1)              eps = 1e-3
    z_y = s * (cos(clip(theta_y - m z_i, eps, pi - eps)) - (m + m z_i)),  theta_y = arccos(clip(cos_y, +-(1 - eps)))
    z_j = s * clip(cos(theta_j), -1 + eps, 1 - eps)                            (j != y)
    ```
    The norm is that of the head's input embeddings (the code takes the backbone's norm as a second input and the
    normalized embeddings: the same numbers). Where the code and the paper differ the head follows the code:
    the statistics are updated BEFORE the margin uses them, ``std`` is torch's unbiased one (a training batch
    needs >= 2 samples: a batch of 1 gives NaN, as the code's). The default ``t_alpha`` = 0.01 is the released
    training configuration (``head.py``'s own default, 1.0, uses each batch's statistics alone). Calls with
    ``training`` False or None leave the statistics as they are and give ``s * cos(theta)`` (the code has no such
    mode). ``head.loss`` raises: the statistics and the margin need the labels and the norms.

    Paths: dense logits, ``fused_loss=True`` (unchunked) and ``sample_rate`` < 1 (the statistics read only the
    norms). ``chunk_size`` raises a ValueError (``keras_margin.chunked`` has no non-target hook for the clamp).

    Args:
        num_classes: Integer, the number of classes, >= 2.
        s: Float, the scale, > 0. Defaults to `64.0`.
        m: Float, the margin, in [0, pi / 2]. Defaults to `0.4`.
        h: Float > 0, the concentration of the margin scaler (~68 % of samples in [-h, h]). Defaults to `0.333`.
        t_alpha: Float in (0, 1], the batch statistics' weight in their moving averages. Defaults to `0.01`.
{{head_args}}

{{stateful_call_forms}}

    Example:
    >>> import numpy as np, keras
    >>> head = AdaFaceHead(3, s=10.0, t_alpha=1.0, kernel_initializer="identity")
    >>> x, y = np.array([[2.0, 0.0, 0.0], [0.0, 1.0, 1.0]], "float32"), np.array([0, 1])
    >>> np.round(keras.ops.convert_to_numpy(head([x, y], training=True)), 3)
    array([[5.06 , 0.   , 0.   ],
           [0.   , 3.316, 7.071]], dtype=float32)
    >>> round(float(keras.ops.convert_to_numpy(head.batch_mean)), 4)  # mean(2, sqrt(2))
    1.7071

    Reference:
        Kim et al., "AdaFace: Quality Adaptive Margin for Face Recognition", CVPR 2022, arXiv:2204.00964
        (Sec. 3). Authors' code: https://github.com/mk-minchul/AdaFace (`head.py`, `AdaFace`; `config.py`).
    """

    _SAMPLING = True
    _UNSUPPORTED = ("`chunk_size` is not supported: the chunked fused loss (keras_margin.chunked) has no hook for "
                    "the non-target cosines' clamp; use fused_loss=True alone or with sample_rate.")

    def __init__(self, num_classes: int, s: float = adaface.DEFAULT_S, m: float = adaface.DEFAULT_M,
                 h: float = adaface.DEFAULT_H, t_alpha: float = adaface.DEFAULT_T_ALPHA, **kwargs):
        params = adaface.check_adaface_parameters(type(self).__name__, s, m, h, t_alpha)
        super().__init__(num_classes, s=params["s"], **kwargs)
        self.m, self.h, self.t_alpha = params["m"], params["h"], params["t_alpha"]

    def build(self, input_shape):
        super().build(input_shape)
        self.batch_mean = self.add_weight(name="batch_mean", shape=(), dtype="float32", trainable=False,
                                          initializer=initializers.Constant(adaface.INITIAL_BATCH_MEAN))
        self.batch_std = self.add_weight(name="batch_std", shape=(), dtype="float32", trainable=False,
                                         initializer=initializers.Constant(adaface.INITIAL_BATCH_STD))

    def objective(self, cos_theta, class_ids, training: bool, x=None):
        if not training:
            return normface_target, None, self.s
        if x.shape[0] == 1:
            raise ValueError(f"{type(self).__name__}: a training batch needs >= 2 samples (the norm statistics use "
                             "the unbiased std); got a batch of 1.")
        norms = adaface.safe_norms(x)
        mean, std = adaface.adaface_statistics(norms, ops.cast(self.batch_mean, "float32"),
                                               ops.cast(self.batch_std, "float32"), self.t_alpha)
        self.batch_mean.assign(mean)
        self.batch_std.assign(std)
        scaler = adaface.margin_scaler(norms, mean, std, self.h)
        return (lambda cos_y: adaface.adaface_target(cos_y, scaler, self.m)), \
            (lambda cos, cos_y: adaface.adaface_nontarget(cos)), self.s

    def make_loss(self):
        raise self._no_cosine_loss("norm statistics (and its per-sample margin)")

    def get_config(self):
        return {**super().get_config(), "m": self.m, "h": self.h, "t_alpha": self.t_alpha}


@_document_head
@keras.saving.register_keras_serializable(package="keras_margin")
class MagFaceHead(MarginHead):
    """MagFace head (Meng et al., CVPR 2021, arXiv 2103.06627), as the authors' ``models/magface.py`` runs it.

    Formula (a training call; the margin and the regularizer read the norm of the head's input x):
    ```
    a_i  = clamp(|x_i|, l_a, u_a)                        (with its gradient, as the code's x_norm)
    m_i  = (u_m - l_m) / (u_a - l_a) * (a_i - l_a) + l_m
    z_y  = s * cos(theta_y + m_i)  where cos(theta_y) > 0, else s * cos(theta_y)              (easy_margin)
         = s * cos(theta_y + m_i)  where cos(theta_y) > cos(pi - m_i), else s * (cos(theta_y) - m_i sin(m_i))
    z_j  = s * cos(theta_j)        (j != y)
    g(a) = a / u_a^2 + 1 / a
    loss = mean_i CE(z_i, y_i) + lambda_g * mean_i g(a_i)
    ```
    The code's default is the easy margin (``MagLinear(easy_margin=True)``; ``SoftmaxBuilder`` does not change
    it): no margin where theta_y >= pi / 2, so theta_y + m never passes pi. ``easy_margin=False`` is the code's
    other branch, ArcFace's fallback with the per-sample margin. The margin keeps its gradient w.r.t. |x|
    (the code does not detach ``x_norm``); the clamp stops it outside [l_a, u_a], for g(a) too.

    The regularizer needs the norms, so training goes through ``head([x, labels], training=True)``:
    - dense logits (compile with ``keras.losses.SparseCategoricalCrossentropy(from_logits=True)``): the head
      adds ``lambda_g * mean(g(a))`` with ``add_loss`` in each training call, so Keras' total is the code's loss
      (sample weights do not apply to the added term); ``training`` False or None: ``s * cos(theta)``, nothing added;
    - ``fused_loss=True``: the per-sample ``CE_i + lambda_g * g(a_i)`` (its batch mean, added with ``add_loss``,
      is the code's loss); in evaluation the plain ``s * cos`` cross-entropy. ``chunk_size`` and ``sample_rate``
      work as for ArcFace: the margin changes only the target logit, a function of each row's target cosine and
      norm, which ``keras_margin.chunked`` computes once on the (batch,) target cosines.
    ``head(x)`` gives the cosines; ``head.loss`` raises (a cosine-path loss never sees |x|).

    Args:
        num_classes: Integer, the number of classes, >= 2.
        s: Float, the scale, > 0. Defaults to `64.0` (run/run.sh, as are the next five).
        l_a: Float > 0, the lower bound of the magnitude. Defaults to `10.0`.
        u_a: Float > l_a, the upper bound of the magnitude. Defaults to `110.0`.
        l_m: Float in [0, pi), the margin at a = l_a. Defaults to `0.45`.
        u_m: Float in [l_m, pi), the margin at a = u_a. Defaults to `0.8`.
        lambda_g: Float >= 0, the regularizer's weight. Defaults to `35.0` (run/run.sh and the paper;
            trainer.py's own default is 20, below the paper's bound `keras_margin.margins.magface.min_lambda_g()`).
        easy_margin: Boolean; the code's easy margin (see above). Defaults to `True`.
{{head_args}}

    Input shape:
        `(batch_size, embedding_dim)`, or `[(batch_size, embedding_dim), (batch_size,)]`.

    Output shape:
        `(batch_size, num_classes)` float32 cosines or logits; `(batch_size,)` with `fused_loss=True`.

    Example:
    >>> import numpy as np, keras
    >>> head = MagFaceHead(3, s=10.0, kernel_initializer="identity")
    >>> x, y = np.array([[20.0, 0.0, 0.0], [0.0, 30.0, 30.0]], "float32"), np.array([0, 1])  # a = 20, 42.43
    >>> np.round(keras.ops.convert_to_numpy(head([x, y], training=True)), 3)  # m = 0.485, 0.5635
    array([[8.844, 0.   , 0.   ],
           [0.   , 2.201, 7.071]], dtype=float32)
    >>> round(float(keras.ops.convert_to_numpy(head.losses[0])), 4)  # 35 * mean(g(20), g(42.43))
    1.3778

    Reference:
        Meng et al., "MagFace: A Universal Representation for Face Recognition and Quality Assessment", CVPR 2021,
        arXiv:2103.06627 (Sec. 3). Authors' code: https://github.com/IrvingMeng/MagFace (`models/magface.py`,
        `MagLinear` and `MagLoss`; `run/run.sh`, `run/trainer.py`).
    """

    def __init__(self, num_classes: int, s: float = magface.DEFAULT_S, l_a: float = magface.DEFAULT_L_A,
                 u_a: float = magface.DEFAULT_U_A, l_m: float = magface.DEFAULT_L_M, u_m: float = magface.DEFAULT_U_M,
                 lambda_g: float = magface.DEFAULT_LAMBDA_G, easy_margin: bool = magface.DEFAULT_EASY_MARGIN,
                 **kwargs):
        params = magface.check_magface_parameters(type(self).__name__, s, l_a, u_a, l_m, u_m, lambda_g, easy_margin)
        super().__init__(num_classes, s=params["s"], **kwargs)
        self.l_a, self.u_a, self.l_m, self.u_m = params["l_a"], params["u_a"], params["l_m"], params["u_m"]
        self.lambda_g, self.easy_margin = params["lambda_g"], params["easy_margin"]

    def magnitude(self, x):
        """``clamp(|x|, l_a, u_a)`` (batch,) float32."""
        return magface.magnitude(x, self.l_a, self.u_a)

    def target(self, cos_theta_y, magnitude=None):
        """The target cosine at each sample's magnitude ``a`` (batch,), from ``magnitude(x)``."""
        if magnitude is None:
            raise ValueError(f"{type(self).__name__}: the target needs each sample's magnitude: "
                             "target(cos_theta_y, head.magnitude(x)).")
        margin = magface.magface_margin(magnitude, self.l_a, self.u_a, self.l_m, self.u_m)
        return magface.magface_target(cos_theta_y, margin, self.easy_margin)

    def regularizer(self, magnitude):
        """``lambda_g * g(a)`` per sample (batch,)."""
        return self.lambda_g * magface.magface_regularizer(magnitude, self.u_a)

    def label_logits(self, cos_theta, class_ids, training: bool, x):
        if not training:
            return margin_logits(cos_theta, class_ids, normface_target, self.s)
        a = self.magnitude(x)
        self.add_loss(ops.mean(self.regularizer(a)))
        return margin_logits(cos_theta, class_ids, lambda cos_y: self.target(cos_y, a), self.s)

    def per_sample_loss(self, x, class_ids, training: bool = False):
        """Per-sample ``CE_i + lambda_g * g(a_i)`` (training) or the plain ``s * cos`` cross-entropy, (batch,),
        with ``chunk_size`` / ``sample_rate``."""
        kernel, class_ids = self.step_kernel(x, class_ids, training)
        if not training:
            return chunked.margin_loss(x, kernel, class_ids, normface_target, self.s, self.chunk_size,
                                       self.compute_dtype, chunk_by=self.chunk_by, classes_first=self.classes_first)
        a = self.magnitude(x)
        ce = chunked.margin_loss(x, kernel, class_ids, lambda cos_y: self.target(cos_y, a), self.s, self.chunk_size,
                                 self.compute_dtype, chunk_by=self.chunk_by, classes_first=self.classes_first)
        return ce + self.regularizer(a)

    def make_loss(self):
        raise ValueError(
            f"{type(self).__name__}: MagFace's margin and regularizer read the norm of each embedding, which a "
            "cosine-path loss given to compile() never sees. Build a functional model on [embeddings, labels] and "
            "call head([embeddings, labels], training=True) (see the class docstring)."
        )

    def get_config(self):
        return {**super().get_config(), "l_a": self.l_a, "u_a": self.u_a, "l_m": self.l_m, "u_m": self.u_m,
                "lambda_g": self.lambda_g, "easy_margin": self.easy_margin}


@_document_head
@keras.saving.register_keras_serializable(package="keras_margin")
class LSoftmaxHead(_BatchStatisticHead):
    """L-Softmax head (Liu et al., ICML 2016, arXiv 1612.02295), as the authors' Caffe layer runs it.

    Formula (one training call; ``iteration`` is a non-trainable int32 weight, advanced first, as the layer's iter_):
    ```
    lambda = max(lambda_min, base * (1 + gamma * iteration)^(-power))
    z_y = |W_y| |x| (lambda * cos(theta_y) + psi(theta_y)) / (1 + lambda)
    z_j = |W_j| |x| cos(theta_j) = <x, W_j>                                   (j != y)
    psi(theta) = (-1)^k cos(m theta) - 2k,   theta in [k pi / m, (k + 1) pi / m]
    ```
    Un-normalized: neither the embeddings nor the class weights are normalized (``LargeMarginInnerProduct``,
    ``largemargin_inner_product_layer.cpp``, no bias). psi and the schedule are SphereFace's
    (``keras_margin.margins.sphereface``), computed the same way (cos(m theta) from cos(theta), no arccos).
    Calls with ``training`` False or None give the plain inner products ``<x, W_j>`` (the released test nets'
    ``type: SINGLE`` layer) and leave ``iteration`` as it is.

    Call forms (the logits need |x| and the labels, so training goes through ``head([x, labels])``):
    - ``head([x, labels], training=True)``: the logits above, for
      ``keras.losses.SparseCategoricalCrossentropy(from_logits=True)`` (the Caffe ``SoftmaxWithLoss``);
    - with ``fused_loss=True``: the per-sample cross-entropy (batch,), its mean added with ``add_loss``;
    - ``head(x)``: the cosines (for verification; the class decision of the test nets is the argmax of
      ``head([x, labels], training=False)``, the inner products, which weighs classes by |W_j|).
    ``head.loss`` raises: a cosine-path loss never sees |x| and |W_j|. ``chunk_size`` and ``sample_rate`` raise a
    ValueError: ``keras_margin.chunked`` scales every non-target cosine of a row by one number, and L-Softmax
    needs |W_j| per class; Partial FC is not implemented for this head.

    Args:
        num_classes: Integer, the number of classes, >= 2.
        m: Integer margin, 1 to 4 (`type` SINGLE .. QUADRUPLE). Defaults to `4` (the MNIST prototxt; the
            CIFAR-10 ones use 2, gamma 0.00002, power 45).
        base: Float > 0, the schedule's initial lambda scale. Defaults to `1000.0` (the released prototxts).
        gamma: Float >= 0, the schedule's rate. Defaults to `0.000025` (the MNIST prototxt).
        power: Float >= 0, the schedule's exponent. Defaults to `35.0` (the MNIST prototxt).
        lambda_min: Float >= 0, the schedule's floor. Defaults to `0.0` (the proto default, also set by the MNIST
            prototxt).
        fused_loss: Boolean. When True, `head([x, labels], training=...)` returns the per-sample loss
            `(batch,)` and adds its batch mean with `add_loss` (compile with `loss=None`). Defaults to `False`.
{{kernel_args}}
        **kwargs: Base layer keyword arguments, such as `name` and `dtype`.

    Input shape:
        `(batch_size, embedding_dim)`, or `[(batch_size, embedding_dim), (batch_size,)]`.

    Output shape:
        `(batch_size, num_classes)` float32 cosines or logits; `(batch_size,)` with `fused_loss=True`.

    Example:
    >>> import numpy as np, keras
    >>> head = LSoftmaxHead(3, m=2, base=1.0, kernel_initializer="identity")  # lambda = 1 throughout
    >>> x, y = np.array([[2.0, 0.0, 0.0], [0.0, 1.0, 1.0]], "float32"), np.array([0, 1])
    >>> np.round(keras.ops.convert_to_numpy(head([x, y], training=True)), 3)  # |x| (cos + psi) / 2 = 1.414 * 0.707 / 2
    array([[2. , 0. , 0. ],
           [0. , 0.5, 1. ]], dtype=float32)
    >>> int(keras.ops.convert_to_numpy(head.iteration))
    1

    Reference:
        Liu et al., "Large-Margin Softmax Loss for Convolutional Neural Networks", ICML 2016, arXiv:1612.02295
        (Sec. 3). Authors' code: https://github.com/wy1iu/LargeMargin_Softmax_Loss
        (`src/caffe/layers/largemargin_inner_product_layer.cpp`, `myexamples/*/model/*_train_test.prototxt`).
    """

    _UNSUPPORTED = ("`chunk_size` and `sample_rate` are not supported: the chunked fused loss (keras_margin.chunked) "
                    "scales a row's non-target cosines by one number, and L-Softmax's are scaled by each class's "
                    "|W_j|; Partial FC is not implemented for this head. Use fused_loss=True alone.")

    _classes_last_only = ("the Caffe layer's (embedding_dim, num_classes) weights; Partial FC, what the class-major "
                          "layout is for, is not implemented for this head.")

    def __init__(self, num_classes: int, m: int = lsoftmax.DEFAULT_M, base: float = lsoftmax.DEFAULT_BASE,
                 gamma: float = lsoftmax.DEFAULT_GAMMA, power: float = lsoftmax.DEFAULT_POWER,
                 lambda_min: float = lsoftmax.DEFAULT_LAMBDA_MIN, **kwargs):
        owner = type(self).__name__
        if "s" in kwargs:
            raise ValueError(f"{owner}: takes no `s`: L-Softmax's logits are scaled by |x| |W_j|.")
        params = lsoftmax.check_lsoftmax_parameters(owner, m, base, gamma, power, lambda_min)
        super().__init__(num_classes, s=1.0, **kwargs)
        self.m, self.base, self.gamma = params["m"], params["base"], params["gamma"]
        self.power, self.lambda_min = params["power"], params["lambda_min"]

    def build(self, input_shape):
        super().build(input_shape)
        self.iteration = self.add_weight(name="iteration", shape=(), dtype="int32", initializer="zeros",
                                         trainable=False)

    def current_lambda(self):
        return sphereface_lambda(self.iteration, self.base, self.gamma, self.power, self.lambda_min)

    def scale(self, x):
        """|x| (batch, 1) float32."""
        x = ops.cast(x, "float32")
        return ops.sqrt(ops.sum(ops.square(x), axis=-1, keepdims=True))

    def target(self, cos_theta_y, w_norm_y=None):
        """The target logit per unit |x| at the current lambda; ``w_norm_y`` (batch,): each target column's norm."""
        if w_norm_y is None:
            raise ValueError(f"{type(self).__name__}: the target needs each sample's |W_y|: target(cos_theta_y, "
                             "w_norm_y).")
        return lsoftmax.lsoftmax_target(cos_theta_y, w_norm_y, self.m, self.current_lambda())

    def objective(self, cos_theta, class_ids, training: bool, x=None):
        # The kernel is the head's own: no class sampling (see _UNSUPPORTED).
        w_norm = lsoftmax.column_norms(self.kernel)
        w_norm_y = ops.take(w_norm, ops.where(class_ids >= 0, class_ids, 0))  # an invalid id's row is NaN anyway
        if training:
            self.iteration.assign_add(1)
            lambda_ = self.current_lambda()
            target = lambda cos_y: lsoftmax.lsoftmax_target(cos_y, w_norm_y, self.m, lambda_)  # noqa: E731
        else:
            target = lambda cos_y: w_norm_y * cos_y  # noqa: E731
        return target, (lambda cos, cos_y: lsoftmax.lsoftmax_nontarget(cos, w_norm)), self.scale(x)

    def make_loss(self):
        raise ValueError(
            f"{type(self).__name__}: L-Softmax's logits |x| |W_j| cos(theta_j) need the embeddings' norms and the "
            "labels, which a cosine-path loss given to compile() never sees. Build a functional model on "
            "[embeddings, labels] and call head([embeddings, labels], training=True) (see the class docstring)."
        )

    def get_config(self):
        config = super().get_config()
        for key in ("s", "chunk_size", "sample_rate", "sample_update"):
            config.pop(key)
        return {**config, "m": self.m, "base": self.base, "gamma": self.gamma, "power": self.power,
                "lambda_min": self.lambda_min}
