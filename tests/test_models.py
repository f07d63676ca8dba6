"""keras_margin.models: the backbones' structure, published parameter counts, Caffe weight loading, and that
each serializes, trains under XLA and builds under mixed precision.

References: a NumPy forward of the Caffe Face-ResNet written from conv_layer.cpp / prelu_layer.cpp /
eltwise_layer.cpp / inner_product_layer.cpp (tests/caffe_nets.caffe_conv, NCHW flatten), and the Caffe
converter's own model of the shared prototxts with the same seeded caffemodel.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

from converters.caffe.backbones import load_caffe_weights
from keras_margin.models import (
    FACE_RESNET_UNITS,
    IRESNET_PARAMETERS,
    MOBILEFACENET_COUNTS,
    MOBILEFACENET_PUBLISHED_PARAMETERS,
    face_resnet,
    iresnet,
    mobilefacenet,
)
from tests.caffe_nets import SHARED, caffe_conv, face_resnet20_blobs, nhwc, shared_missing, write_net

REAL = SHARED / "caffe" / "real"
SPHEREFACE_DEPLOY = REAL / "wy1iu_sphereface__train__code__sphereface_deploy.prototxt"
AMSOFTMAX_DEPLOY = REAL / "happynear_AMSoftmax__prototxt__face_deploy_mirror_normalize.prototxt"
TINY = (4, 4, 8, 8)


def _count(weights) -> int:
    return sum(int(np.prod(weight.shape)) for weight in weights)


def _blobs(depth: int, widths, input_hw, embedding: int, seed: int = 0) -> dict[str, list[np.ndarray]]:
    """Seeded Caffe-layout blobs for every layer of a Face-ResNet-``depth`` (names as the prototxts)."""
    rng = np.random.default_rng(seed)
    blobs, channels, (h, w) = {}, 3, input_hw
    for stage, (units, width) in enumerate(zip(FACE_RESNET_UNITS[depth], widths), start=1):
        for index in range(1, 2 * units + 2):
            gain = np.sqrt(2.0 / (channels * 9)) * (0.5 if index > 1 and index % 2 == 1 else 1.0)
            blobs[f"conv{stage}_{index}"] = [
                (rng.standard_normal((width, channels, 3, 3)) * gain).astype(np.float32),
                (rng.standard_normal(width) * 0.05).astype(np.float32)]
            blobs[f"relu{stage}_{index}"] = [rng.uniform(0.15, 0.35, width).astype(np.float32)]
            channels = width
        h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1
    k = channels * h * w
    blobs["fc5"] = [(rng.standard_normal((embedding, k)) * np.sqrt(1.0 / k)).astype(np.float32),
                    (rng.standard_normal(embedding) * 0.05).astype(np.float32)]
    return blobs


def _numpy_face_resnet(x: np.ndarray, blobs, depth: int) -> np.ndarray:
    """Caffe's forward on NCHW ``x``: conv (pad 1) + per-channel PReLU, residual Eltwise SUM, InnerProduct over
    the (C, H, W)-flattened map."""

    def conv_prelu(y, name, stride):
        weight, bias = blobs[name]
        y = caffe_conv(y, weight, bias, stride=(stride, stride), pad=(1, 1))
        slope = blobs["relu" + name[4:]][0].astype(np.float64).reshape(1, -1, 1, 1)
        return np.maximum(y, 0) + slope * np.minimum(y, 0)

    y = x.astype(np.float64)
    for stage, units in enumerate(FACE_RESNET_UNITS[depth], start=1):
        y = conv_prelu(y, f"conv{stage}_1", 2)
        for unit in range(units):
            branch = conv_prelu(conv_prelu(y, f"conv{stage}_{2 * unit + 2}", 1), f"conv{stage}_{2 * unit + 3}", 1)
            y = y + branch
    weight, bias = blobs["fc5"]
    return y.reshape(len(y), -1) @ weight.T.astype(np.float64) + bias


# ----------------------------------------------------------------------------------------------------
# Face-ResNet structure and Caffe weights
# ----------------------------------------------------------------------------------------------------


@pytest.mark.backend_agnostic
@pytest.mark.parametrize("depth", sorted(FACE_RESNET_UNITS))
def test_face_resnet_depth_counts_its_convolutions(depth):
    model = face_resnet(depth, input_shape=(16, 16, 3), embedding_dim=8, widths=TINY)
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    prelus = [layer for layer in model.layers if isinstance(layer, keras.layers.PReLU)]
    adds = [layer for layer in model.layers if isinstance(layer, keras.layers.Add)]
    assert len(convs) == len(prelus) == depth  # SphereFace's depth counts the convolutions
    assert len(adds) == sum(FACE_RESNET_UNITS[depth])
    assert [c.strides for c in convs if c.name.endswith("_1")] == [(2, 2)] * 4


def test_face_resnet20_names_shapes_and_published_count():
    """Face-ResNet-20 at 112x96: the prototxt's layer names, a 7x6x512 map into fc5, and 22,670,656 weights
    (OpenVINO's model zoo card for SphereFace-20 lists 22.671 MParams)."""
    model = face_resnet(20)
    names = [layer.name for layer in model.layers]
    for name in ("conv1_1", "relu1_1", "conv1_3", "res1_3", "res2_5", "res3_9", "conv4_3", "res4_3", "fc5"):
        assert name in names
    assert tuple(model.get_layer("fc5_flatten").input.shape) == (None, 7, 6, 512)
    assert model.output_shape == (None, 512)
    assert model.count_params() == 22_670_656
    assert model.get_layer("conv1_1_pad").padding == ((1, 1), (1, 1))
    assert model.get_layer("conv1_1").padding == "valid"


def test_face_resnet_rejects_unknown_depth():
    with pytest.raises(ValueError, match="4, 10, 20, 36, 64"):
        face_resnet(18)


@pytest.mark.parametrize("depth", [4, 10])
def test_face_resnet_with_caffe_weights_matches_numpy_caffe(tmp_path, depth):
    """Odd sizes (13x11) exercise Caffe's stride-2 pad-1 rule: out = floor((in - 1) / 2) + 1."""
    widths, hw = (4, 6, 8, 8), (13, 11)
    blobs = _blobs(depth, widths, hw, 5)
    _, caffemodel = write_net(tmp_path, 'name: "x"', blobs)
    model = face_resnet(depth, input_shape=(*hw, 3), embedding_dim=5, widths=widths)
    loaded = load_caffe_weights(model, caffemodel)
    assert len(loaded) == 2 * depth + 1
    x = np.random.default_rng(3).uniform(-1, 1, (2, 3, *hw)).astype(np.float32)
    got = np.asarray(model(nhwc(x)))
    np.testing.assert_allclose(got, _numpy_face_resnet(x, blobs, depth), rtol=1e-4, atol=1e-5)


def test_load_caffe_weights_names_the_missing_or_misshapen_layer(tmp_path):
    blobs = _blobs(4, TINY, (16, 16), 8)
    model = face_resnet(4, input_shape=(16, 16, 3), embedding_dim=8, widths=TINY)
    del blobs["relu3_1"]
    _, caffemodel = write_net(tmp_path, 'name: "x"', blobs)
    with pytest.raises(ValueError, match="relu3_1"):
        load_caffe_weights(model, caffemodel)
    assert "relu3_1" not in load_caffe_weights(model, caffemodel, strict=False)
    wide = face_resnet(4, input_shape=(16, 16, 3), embedding_dim=8, widths=(4, 4, 8, 16))
    with pytest.raises(ValueError, match="conv4_1"):
        load_caffe_weights(wide, caffemodel, strict=False)
    with pytest.raises(TypeError):
        load_caffe_weights(model, 3)


def _seeded_net(tmp_path, prototxt, hw):
    """The shared prototxt with its input resized to ``hw`` (so fc5 is small) and a seeded caffemodel."""
    text = prototxt.read_text()
    for old, new in (("input_dim: 112", f"input_dim: {hw[0]}"), ("input_dim: 96", f"input_dim: {hw[1]}")):
        assert old in text
        text = text.replace(old, new, 1)
    blobs = face_resnet20_blobs(num_classes=None, input_hw=hw, seed=5)
    return write_net(tmp_path, text, blobs, name=prototxt.stem[:20]), blobs


@pytest.mark.skipif(not SPHEREFACE_DEPLOY.is_file(), reason=shared_missing(SPHEREFACE_DEPLOY, "sphereface_deploy"))
@pytest.mark.parametrize("via", ["caffemodel", "converted"])
def test_face_resnet20_equals_converted_sphereface_deploy(tmp_path, via):
    from converters.caffe import convert

    hw = (24, 20)
    (prototxt, caffemodel), _ = _seeded_net(tmp_path, SPHEREFACE_DEPLOY, hw)
    conversion = convert(prototxt, caffemodel)
    native = face_resnet(20, input_shape=(*hw, 3))
    load_caffe_weights(native, caffemodel if via == "caffemodel" else conversion.model)
    x = np.random.default_rng(7).uniform(-1, 1, (1, *hw, 3)).astype(np.float32)
    want = np.asarray(conversion.model(x))
    np.testing.assert_allclose(np.asarray(native(x)), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.skipif(not AMSOFTMAX_DEPLOY.is_file(), reason=shared_missing(AMSOFTMAX_DEPLOY, "AM-Softmax deploy"))
def test_face_resnet20_equals_amsoftmax_deploy_fc5(tmp_path):
    """The AM-Softmax deploy net mirrors the batch (Flip + Concat) and normalises after fc5: compare its fc5
    blob (the first N rows are the unflipped images)."""
    from converters.caffe import convert

    hw = (24, 20)
    (prototxt, caffemodel), _ = _seeded_net(tmp_path, AMSOFTMAX_DEPLOY, hw)
    conversion = convert(prototxt, caffemodel, input_shape=(3, *hw))
    fc5 = keras.Model(conversion.model.inputs, conversion.tensors["fc5"])
    native = face_resnet(20, input_shape=(*hw, 3))
    load_caffe_weights(native, caffemodel)
    x = np.random.default_rng(8).uniform(-1, 1, (2, *hw, 3)).astype(np.float32)
    want = np.asarray(fc5([x]))[:2]
    np.testing.assert_allclose(np.asarray(native(x)), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


# ----------------------------------------------------------------------------------------------------
# Published parameter counts (built, never run)
# ----------------------------------------------------------------------------------------------------


@pytest.mark.backend_agnostic
@pytest.mark.parametrize("depth", [50, 100])
def test_iresnet_parameter_count_is_arcface_torchs(depth):
    """PyTorch counts arcface_torch's fixed features.weight (512) and no BN statistics; Keras omits the fixed
    scale (scale=False) and keeps moving mean/variance as non-trainable weights."""
    model = iresnet(depth)
    bn_channels = sum(layer.moving_mean.shape[0] for layer in model.layers
                      if isinstance(layer, keras.layers.BatchNormalization))
    assert _count(model.trainable_weights) + 512 == IRESNET_PARAMETERS[depth]
    assert _count(model.non_trainable_weights) == 2 * bn_channels
    assert model.output_shape == (None, 512)
    assert tuple(model.get_layer("flatten").input.shape) == (None, 7, 7, 512)


@pytest.mark.backend_agnostic
def test_mobilefacenet_parameter_count():
    model = mobilefacenet()
    counts = {"conv": 0, "prelu": 0, "bn_affine": 0, "bn_statistics": 0}
    for layer in model.layers:
        for weight in layer.weights:
            size = int(np.prod(weight.shape))
            if isinstance(layer, keras.layers.BatchNormalization):
                counts["bn_statistics" if weight.name.startswith("moving") else "bn_affine"] += size
            elif isinstance(layer, keras.layers.PReLU):
                counts["prelu"] += size
            else:
                counts["conv"] += size
    assert counts == MOBILEFACENET_COUNTS
    # the paper's rounded 0.99M lies between the conv weights alone and every trainable weight
    assert counts["conv"] <= MOBILEFACENET_PUBLISHED_PARAMETERS <= _count(model.trainable_weights)
    assert abs(_count(model.trainable_weights) - MOBILEFACENET_PUBLISHED_PARAMETERS) < 0.015e6
    assert model.output_shape == (None, 128)
    assert tuple(model.get_layer("gdconv").output.shape) == (None, 1, 1, 512)


# ----------------------------------------------------------------------------------------------------
# Every backbone: serializable, XLA training step, mixed precision
# ----------------------------------------------------------------------------------------------------

BACKBONES = {
    "face_resnet": lambda: face_resnet(10, input_shape=(16, 16, 3), embedding_dim=8, widths=TINY),
    "iresnet": lambda: iresnet(18, input_shape=(16, 16, 3), embedding_dim=8, widths=TINY, blocks=(1, 1, 1, 1)),
    "mobilefacenet": lambda: mobilefacenet(input_shape=(32, 32, 3), embedding_dim=8,
                                           bottlenecks=((2, 8, 1, 2),), width=8),
}


@pytest.mark.backend_agnostic
@pytest.mark.parametrize("kind", sorted(BACKBONES))
def test_backbone_keras_round_trip(tmp_path, kind):
    model = BACKBONES[kind]()
    x = np.random.default_rng(0).uniform(-1, 1, (2, *model.input_shape[1:])).astype(np.float32)
    path = tmp_path / f"{kind}.keras"
    model.save(path)
    again = keras.saving.load_model(path)
    assert [layer.name for layer in again.layers] == [layer.name for layer in model.layers]
    np.testing.assert_allclose(np.asarray(again(x)), np.asarray(model(x)), rtol=1e-6, atol=1e-6)
    assert keras.Model.from_config(model.get_config()).count_params() == model.count_params()


@pytest.mark.backend_agnostic
@pytest.mark.parametrize("kind", sorted(BACKBONES))
def test_backbone_trains_under_xla(kind):
    model = BACKBONES[kind]()
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, (4, *model.input_shape[1:])).astype(np.float32)
    y = rng.standard_normal((4, 8)).astype(np.float32)
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse", jit_compile=True)
    before = [np.array(w) for w in model.trainable_weights]
    history = model.fit(x, y, batch_size=2, epochs=1, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert any(not np.allclose(a, np.asarray(b)) for a, b in zip(before, model.trainable_weights))


@pytest.mark.backend_agnostic
@pytest.mark.parametrize("kind", sorted(BACKBONES))
def test_backbone_mixed_float16(kind):
    keras.mixed_precision.set_global_policy("mixed_float16")  # conftest restores float32
    model = BACKBONES[kind]()
    x = np.random.default_rng(2).uniform(-1, 1, (2, *model.input_shape[1:])).astype(np.float32)
    out = model(x)
    assert keras.backend.standardize_dtype(out.dtype) == "float32"  # the embedding layer computes in float32
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert convs[0].compute_dtype == "float16"
    assert np.all(np.isfinite(np.asarray(out)))
