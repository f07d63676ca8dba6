"""kernel_layout="classes_first": a class-major (C, d) kernel gives the numbers of the (d, C) kernel it transposes.

The reference is the default layout, itself checked against NumPy transcriptions of the papers and the released
code elsewhere (test_losses_reference, test_sampling, test_chunked): the same initial weights, transposed, must
give the same cosines, losses and updated weights (kernel, trunk, agents) through several XLA training steps,
on every path that takes the layout (dense, chunked by classes, Partial FC V2 and v1, the batch-statistic and
agent heads).
"""

import keras
import numpy as np
import pytest
from keras import ops

import keras_margin as km

pytestmark = pytest.mark.backend_agnostic

C, D, B = 10, 4, 6
_V1 = {"sample_rate": 0.7, "sample_update": "sampled"}  # K = 7 of 10: the batch's 5 classes and 2 more

CASES = {
    "amsoftmax dense": (km.AMSoftmaxHead, {"s": 10.0, "m": 0.35, "fused_loss": True}),
    "arcface chunked": (km.ArcFaceHead, {"s": 10.0, "fused_loss": True, "chunk_size": 3}),  # 3 does not divide 10
    "sphereface cosine path": (km.SphereFaceHead, {}),
    "normface learned scale, partial fc v2": (km.NormFaceHead, {"learn_scale": True, "fused_loss": True,
                                                                "sample_rate": 0.5}),
    "amsoftmax partial fc v1 sparse": (km.AMSoftmaxHead, {"s": 10.0, "fused_loss": True, **_V1}),
    "x2softmax partial fc v1 dense": (km.X2SoftmaxHead, {"s": 10.0, "fused_loss": True, **_V1}),
    "curricularface sampled": (km.CurricularFaceHead, {"s": 10.0, "fused_loss": True, "sample_rate": 0.5}),
    "magface chunked": (km.MagFaceHead, {"s": 10.0, "fused_loss": True, "chunk_size": 4}),
    "normface contrastive agents": (km.NormFaceContrastiveHead, {}),
}


def _train(name, kernel_layout):
    make, options = CASES[name]
    head = make(C, kernel_layout=kernel_layout, name="head", **options)
    images, labels = keras.Input((5,)), keras.Input((), dtype="int32")
    trunk = keras.layers.Dense(D, name="trunk")
    embeddings = trunk(images)
    cosine_path = name.endswith("cosine path")
    if cosine_path:
        model, loss = keras.Model(images, head(embeddings)), head.loss
    else:
        loss = None if head.fused_loss else keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        model = keras.Model([images, labels], head([embeddings, labels]))
    rng = np.random.default_rng(0)
    trunk.kernel.assign(rng.normal(size=(5, D)).astype("float32"))
    initial = {}
    for weight in [head.kernel] + ([head.agents] if hasattr(head, "agents") else []):
        initial[weight.name] = value = rng.normal(size=(D, C)).astype("float32")
        weight.assign(value.T if kernel_layout == "classes_first" else value)
    if head.sample_rate < 1.0:  # both heads draw the same samples
        head.seed_generator.state.assign(ops.cast(ops.convert_to_tensor([7, 0]), head.seed_generator.state.dtype))
    optimizer = keras.optimizers.SGD(0.5, momentum=0.9)
    if options.get("sample_update") == "sampled":
        optimizer = km.PartialFCOptimizer(optimizer, update="dense" if name.endswith("dense") else "sparse")
    model.compile(optimizer, loss=loss, jit_compile=True)
    x = rng.normal(size=(B, 5)).astype("float32")
    y = np.array([0, 3, 5, 3, 9, 1], "int32")
    cosines = ops.convert_to_numpy(head(trunk(x)))
    losses = [float(model.train_on_batch(x if cosine_path else [x, y], y if loss is not None else None))
              for _ in range(3)]

    def dc(weight):  # (d, C), whatever the layout
        value = ops.convert_to_numpy(weight)
        return value.T if kernel_layout == "classes_first" else value

    weights = {"kernel": dc(head.kernel), "trunk": ops.convert_to_numpy(trunk.kernel)}
    if hasattr(head, "agents"):
        weights["agents"] = dc(head.agents)
    if getattr(head, "learn_scale", False):
        weights["scale"] = ops.convert_to_numpy(head.scale_weight)
    return head, cosines, losses, weights, initial["kernel"]


@pytest.mark.parametrize("name", list(CASES))
def test_class_major_head_trains_as_the_transposed_kernel(name):
    head, cosines, losses, weights, initial_kernel = _train(name, "classes_first")
    assert head.kernel.shape == (C, D) and head.embedding_dim == D
    _, expected_cosines, expected_losses, expected_weights, _ = _train(name, "classes_last")
    np.testing.assert_allclose(cosines, expected_cosines, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-5, atol=1e-6)
    assert np.all(np.isfinite(losses)) and losses[-1] != losses[0]
    assert weights.keys() == expected_weights.keys()
    for key, value in weights.items():
        np.testing.assert_allclose(value, expected_weights[key], rtol=1e-5, atol=1e-6, err_msg=key)
    assert np.abs(weights["kernel"] - initial_kernel).max() > 1e-3  # the steps did move the kernel


def test_kernel_layout_is_in_the_config_and_survives_a_keras_file(tmp_path):
    head = km.ArcFaceHead(C, kernel_layout="classes_first", fused_loss=True, chunk_size=4, name="head")
    assert head.get_config()["kernel_layout"] == "classes_first"
    assert km.ArcFaceHead.from_config(head.get_config()).kernel_layout == "classes_first"
    assert km.CosineDense(3).get_config()["kernel_layout"] == "classes_last"
    embeddings = keras.Input((D,))
    model = keras.Model(embeddings, head(embeddings))
    x = np.random.default_rng(1).normal(size=(3, D)).astype("float32")
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert loaded.get_layer("head").kernel.shape == (C, D)
    np.testing.assert_array_equal(ops.convert_to_numpy(loaded(x)), ops.convert_to_numpy(model(x)))


def test_kernel_layout_refusals_name_the_problem():
    with pytest.raises(ValueError, match="`kernel_layout` must be one of"):
        km.AMSoftmaxHead(C, kernel_layout="dc")
    with pytest.raises(ValueError, match="`kernel_layout` must be one of"):
        km.CosineDense(3, kernel_layout="channels_first")
    with pytest.raises(ValueError, match="chunk_by='rows'.*classes_first"):
        km.AMSoftmaxHead(C, fused_loss=True, chunk_size=4, chunk_by="rows", kernel_layout="classes_first")
    with pytest.raises(ValueError, match="sub-centers"):
        km.SubCenterArcFaceHead(C, kernel_layout="classes_first")
    with pytest.raises(ValueError, match="'classes_last'"):
        km.LSoftmaxHead(C, kernel_layout="classes_first")
    from keras_margin.chunked import margin_loss

    with pytest.raises(ValueError, match="chunk_by='rows' takes a \\(d, C\\) kernel"):
        margin_loss(np.ones((2, D), "float32"), np.ones((C, D), "float32"), np.array([0, 1]), lambda c: c, 1.0,
                    chunk_size=2, chunk_by="rows", classes_first=True)


def test_class_major_head_checks_the_embedding_size():
    head = km.AMSoftmaxHead(C, kernel_layout="classes_first")
    head.build((None, D))
    with pytest.raises(ValueError, match=str(D)):
        head(np.ones((2, D + 1), "float32"))
