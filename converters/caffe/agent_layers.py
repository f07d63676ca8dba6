"""Keras layers for NormFace's agent layers of the happynear fork (``inner_distance_layer.cpp``) and for the
fork's InnerProduct whose weights come in as a second bottom; serializable (package "keras_margin_caffe").
"""

from __future__ import annotations

import keras
from keras import ops

from converters.caffe.fork import FORK_EPS

__all__ = ["InnerDistance", "PairwiseInnerDistance", "SecondBottomInnerProduct", "UnitColumns", "ClassIds",
           "AGENT_NORM_EPS"]

#: Eps of the fork's in-place agent normalisation (``InnerDistanceLayer::Forward_cpu``: ``dot + 1e-6``; its GPU
#: code adds none) and of its Normalize layer (CPU).
AGENT_NORM_EPS = FORK_EPS

_serializable = keras.saving.register_keras_serializable(package="keras_margin_caffe")


def _distances(x, agents_t, distance: str):
    """D[m, n] between rows x[m] (M, K) and columns agents_t[:, n] (K, N): squared L2 or L1 (Caffe's loops)."""
    x = ops.cast(x, "float32")
    agents_t = ops.cast(agents_t, "float32")
    if distance == "L2":  # sum_k (x - w)^2 = |x|^2 + |w|^2 - 2 x.w, clipped at 0 against rounding
        x_sq = ops.sum(ops.square(x), axis=-1, keepdims=True)
        w_sq = ops.sum(ops.square(agents_t), axis=0, keepdims=True)
        return ops.maximum(x_sq + w_sq - 2.0 * ops.matmul(x, agents_t), 0.0)
    return ops.sum(ops.abs(x[:, :, None] - agents_t[None, :, :]), axis=1)  # (M, K, N) -> (M, N)


def _check_distance(owner: str, distance: str) -> str:
    if distance not in ("L2", "L1"):
        raise ValueError(f"{owner}: distance must be 'L2' or 'L1' (the fork's distance_type); got {distance!r}")
    return distance


@_serializable
class UnitColumns(keras.constraints.Constraint):
    """Rescale each column w to ``w / sqrt(|w|^2 + eps)`` after each update (the fork's in-place
    renormalisation of the agent rows, done there at the start of the next forward)."""

    def __init__(self, eps: float = AGENT_NORM_EPS):
        self.eps = float(eps)

    def __call__(self, w):
        return w * ops.rsqrt(ops.sum(ops.square(w), axis=0, keepdims=True) + ops.cast(self.eps, w.dtype))

    def get_config(self):
        return {"eps": self.eps}


@_serializable
class InnerDistance(keras.layers.Layer):
    """The fork's ``InnerDistance`` with its own agents blob: distances between each input row and each agent.

    Formula (``inner_distance_layer.cpp``, ``Forward_cpu``):
    ```
    normalize: W_n <- W_n / sqrt(|W_n|^2 + 1e-6)       each agent row, in place, before every forward
    L2: D[m, n] = sum_k (x[m, k] - W[n, k])^2           (squared distance, no square root)
    L1: D[m, n] = sum_k |x[m, k] - W[n, k]|
    ```
    The kernel is (input_dim, num_output) (Keras layout: column n is Caffe's agent row n). With
    ``normalize=True`` the forward uses the renormalised kernel with the scale factor outside the gradient and
    the kernel is renormalised after each update (``UnitColumns``): Caffe's hard normalisation, whose gradient
    is that of the unit agents, not through the normalisation.
    """

    def __init__(self, num_output: int, distance: str = "L2", normalize: bool = False,
                 kernel_initializer="random_normal", **kwargs):
        super().__init__(**kwargs)
        self.num_output = int(num_output)
        self.distance = _check_distance(type(self).__name__, distance)
        self.normalize = bool(normalize)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)

    def build(self, input_shape):
        self.kernel = self.add_weight(name="kernel", shape=(int(input_shape[-1]), self.num_output),
                                      initializer=self.kernel_initializer,
                                      constraint=UnitColumns() if self.normalize else None)

    def agents(self):
        """The agents as the forward uses them, (input_dim, num_output)."""
        kernel = ops.cast(self.kernel, "float32")
        if not self.normalize:
            return kernel
        scale = ops.rsqrt(ops.sum(ops.square(kernel), axis=0, keepdims=True) + AGENT_NORM_EPS)
        return kernel * ops.stop_gradient(scale)

    def call(self, inputs):
        return _distances(inputs, self.agents(), self.distance)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_output)

    def get_config(self):
        return {**super().get_config(), "num_output": self.num_output, "distance": self.distance,
                "normalize": self.normalize,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer)}


@_serializable
class PairwiseInnerDistance(keras.layers.Layer):
    """The fork's ``InnerDistance`` with the agents as a second bottom: ``[x (M, K), agents (N, K)] -> D (M, N)``,
    D as in ``InnerDistance`` (squared L2 or L1; no normalisation of a bottom)."""

    def __init__(self, distance: str = "L2", **kwargs):
        super().__init__(**kwargs)
        self.distance = _check_distance(type(self).__name__, distance)

    def call(self, inputs):
        x, agents = inputs
        return _distances(x, ops.transpose(agents), self.distance)

    def compute_output_shape(self, input_shape):
        return (input_shape[0][0], input_shape[1][0])

    def get_config(self):
        return {**super().get_config(), "distance": self.distance}


@_serializable
class SecondBottomInnerProduct(keras.layers.Layer):
    """The fork's two-bottom ``InnerProduct``: ``[x (M, K), W (N, K)] -> x W^T (M, N)`` (the weights are the
    second bottom; ``inner_product_layer.cpp`` reads them instead of a blob)."""

    def call(self, inputs):
        x, weight = inputs
        return ops.matmul(x, ops.transpose(ops.cast(weight, x.dtype)))

    def compute_output_shape(self, input_shape):
        return (input_shape[0][0], input_shape[1][0])


@_serializable
class ClassIds(keras.layers.Layer):
    """A Caffe label blob (float class ids, as Caffe stores them) as int32 class ids: ``int32(label)``."""

    def call(self, inputs):
        return ops.cast(ops.reshape(inputs, (-1,)), "int32")

    def compute_output_shape(self, input_shape):
        return (input_shape[0],)

    def compute_output_spec(self, inputs):
        return keras.KerasTensor((inputs.shape[0],), dtype="int32")
