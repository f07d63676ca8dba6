"""Reading: the schema's field numbers, text and binary files in current and V1 formats, legacy inputs,
phase rules and in-place blobs."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from converters.caffe import (
    CaffeWarning,
    ConversionError,
    convert,
    read_caffemodel,
    read_prototxt,
    schema,
    write_caffemodel,
)
from converters.caffe.builder import load_caffe_model
from converters.caffe.planner import plan_net
from converters.caffe.reader import parse_prototxt
from tests.caffe_nets import AMSOFTMAX_DIR, SHARED_MISSING, keras_outputs, opencv_forward, write_net

# Field numbers from caffe_format.md (BVLC caffe.proto, happynear's fork): the wire format must match them.
FIELD_NUMBERS = {
    ("NetParameter", "name"): 1, ("NetParameter", "layers"): 2, ("NetParameter", "input"): 3,
    ("NetParameter", "input_dim"): 4, ("NetParameter", "input_shape"): 8, ("NetParameter", "layer"): 100,
    ("LayerParameter", "name"): 1, ("LayerParameter", "type"): 2, ("LayerParameter", "bottom"): 3,
    ("LayerParameter", "top"): 4, ("LayerParameter", "blobs"): 7, ("LayerParameter", "include"): 8,
    ("LayerParameter", "transform_param"): 100, ("LayerParameter", "convolution_param"): 106,
    ("LayerParameter", "inner_product_param"): 117, ("LayerParameter", "pooling_param"): 121,
    ("LayerParameter", "batch_norm_param"): 139, ("LayerParameter", "scale_param"): 142,
    ("LayerParameter", "flip_param"): 212, ("LayerParameter", "normalize_param"): 214,
    ("LayerParameter", "margin_inner_product_param"): 232, ("LayerParameter", "label_specific_add_param"): 241,
    ("BlobProto", "num"): 1, ("BlobProto", "width"): 4, ("BlobProto", "data"): 5, ("BlobProto", "shape"): 7,
    ("BlobProto", "double_data"): 8, ("BlobProto", "raw_data"): 12, ("BlobShape", "dim"): 1,
    ("V1LayerParameter", "bottom"): 2, ("V1LayerParameter", "name"): 4, ("V1LayerParameter", "type"): 5,
    ("V1LayerParameter", "blobs"): 6, ("V1LayerParameter", "convolution_param"): 10,
    ("V1LayerParameter", "inner_product_param"): 17, ("V1LayerParameter", "include"): 32,
    ("V1LayerParameter", "prelu_param"): 45,
    ("ConvolutionParameter", "dilation"): 18, ("ConvolutionParameter", "group"): 5,
    ("InnerProductParameter", "transpose"): 6, ("InnerProductParameter", "normalize"): 7,
    ("PoolingParameter", "global_pooling"): 12, ("PoolingParameter", "round_mode"): 13,
    ("BatchNormParameter", "eps"): 3, ("LabelSpecificAddParameter", "bias"): 1,
    ("MarginInnerProductParameter", "lambda_min"): 9, ("MarginInnerProductParameter", "iteration"): 8,
}


@pytest.mark.parametrize("message, field", sorted(FIELD_NUMBERS))
def test_schema_field_numbers_are_caffes(message, field):
    descriptor = schema.message_class(message).DESCRIPTOR
    assert descriptor.fields_by_name[field].number == FIELD_NUMBERS[message, field]


def test_schema_enums_and_defaults_are_caffes():
    layer_type = schema.V1LayerParameter.DESCRIPTOR.fields_by_name["type"].enum_type
    assert {name: layer_type.values_by_name[name].number for name in ("CONVOLUTION", "INNER_PRODUCT", "POOLING")} == \
        {"CONVOLUTION": 4, "INNER_PRODUCT": 14, "POOLING": 17}
    assert schema.message_class("BatchNormParameter")().eps == pytest.approx(1e-5)
    assert schema.message_class("FlipParameter")().flip_width is True
    assert schema.message_class("ConvolutionParameter")().bias_term is True
    assert schema.NetState().phase == 1  # TEST


@pytest.mark.parametrize("name, layers", [("face_deploy_mirror_normalize.prototxt", 55), ("face_train_test.prototxt", 57)])
def test_released_prototxts_parse_completely(name, layers):
    path = AMSOFTMAX_DIR / name
    if not path.exists():
        pytest.skip(SHARED_MISSING)
    net = read_prototxt(path)
    assert net.unknown_fields == []
    assert len(net.net.layer) == layers
    residual = [layer for layer in net.net.layer if layer.name == "res1_3"][0]
    assert residual.eltwise_param.operation == 1  # written "operation: 1": SUM


def test_unknown_fields_of_other_forks_are_reported_not_fatal(tmp_path):
    text = """input: "data"
input_shape { dim: 1 dim: 4 }
layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc"
  inner_product_param { num_output: 3 weight_filler { type: "xavier" some_fork_option: 2 } }
  sparse_learning_param { threshold: 0.1 } }
"""
    prototxt, _ = write_net(tmp_path, text)
    net = read_prototxt(prototxt)
    assert [(f.layer, f.line, f.path) for f in net.unknown_fields] == [
        ("fc", 4, "layer[0].inner_product_param.weight_filler.some_fork_option"),
        ("fc", 5, "layer[0].sparse_learning_param"),
    ]
    with pytest.warns(CaffeWarning, match="2 prototxt field"):
        model = load_caffe_model(prototxt)
    assert model.output_shape == (None, 3)


V1_NET = """name: "V1-net"
input: "data"
input_dim: 2
input_dim: 3
input_dim: 10
input_dim: 10
layers { name: "conv1" type: CONVOLUTION bottom: "data" top: "conv1" blobs_lr: 1 blobs_lr: 2
         convolution_param { num_output: 4 kernel_size: 3 stride: 1 pad: 1 } }
layers { name: "relu1" type: RELU bottom: "conv1" top: "conv1" }
layers { name: "pool1" type: POOLING bottom: "conv1" top: "pool1" pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layers { name: "fc6" type: INNER_PRODUCT bottom: "pool1" top: "fc6" inner_product_param { num_output: 5 } }
layers { name: "drop6" type: DROPOUT bottom: "fc6" top: "fc6" dropout_param { dropout_ratio: 0.5 } }
layers { name: "prob" type: SOFTMAX bottom: "fc6" top: "prob" }
"""


def test_v1_prototxt_and_caffemodel_with_legacy_dims_convert(tmp_path):
    rng = np.random.default_rng(0)
    blobs = {"conv1": [rng.standard_normal((4, 3, 3, 3)).astype(np.float32), rng.standard_normal(4).astype(np.float32)],
             "fc6": [rng.standard_normal((5, 4 * 5 * 5)).astype(np.float32) * 0.1, rng.standard_normal(5).astype(np.float32)]}
    prototxt = tmp_path / "v1.prototxt"
    prototxt.write_text(V1_NET)
    net = parse_prototxt(V1_NET)
    assert net.source_format == "V1" and [layer.type for layer in net.net.layer] == [
        "Input", "Convolution", "ReLU", "Pooling", "InnerProduct", "Dropout", "Softmax"]
    assert [spec.lr_mult for spec in net.net.layer[1].param] == [1, 2]
    caffemodel = tmp_path / "v1.caffemodel"
    v1_layers = [(name, kind, blobs.get(name, [])) for name, kind in
                 [("conv1", "Convolution"), ("relu1", "ReLU"), ("pool1", "Pooling"), ("fc6", "InnerProduct")]]
    write_caffemodel(caffemodel, v1_layers, v1=True, legacy_dims=True)
    weights = read_caffemodel(caffemodel)
    assert weights.source_format == "V1" and weights.blob_shapes("fc6") == [(1, 1, 5, 100), (1, 1, 1, 5)]
    x = rng.uniform(-1, 1, (2, 3, 10, 10)).astype(np.float32)
    ours = keras_outputs(convert(prototxt, caffemodel), {"data": x})["prob"]
    (theirs,) = opencv_forward(prototxt, caffemodel, {"data": x}, ["prob"])
    np.testing.assert_allclose(ours, theirs, atol=1e-6)
    assert ours.shape == (2, 5)


@pytest.mark.parametrize("options", [dict(encoding="packed"), dict(encoding="unpacked"), dict(encoding="double"),
                                     dict(legacy_dims=True), dict(v1=True)], ids=lambda o: "-".join(map(str, o.values())))
def test_caffemodel_blob_encodings_read_back_exactly(tmp_path, options):
    rng = np.random.default_rng(1)
    arrays = [rng.standard_normal((6, 2, 3, 3)).astype(np.float32), rng.standard_normal(6).astype(np.float32)]
    path = tmp_path / "w.caffemodel"
    write_caffemodel(path, [("conv", "Convolution", arrays), ("relu", "ReLU", [])], **options)
    weights = read_caffemodel(path)
    assert weights.names() == ["conv", "relu"]
    for got, want in zip(weights.blobs("conv"), arrays):
        np.testing.assert_array_equal(got.reshape(want.shape), want)


def test_caffemodel_written_by_the_full_schema_is_read(tmp_path):
    net = schema.NetParameter(name="full")
    layer = net.layer.add(name="fc", type="InnerProduct")
    blob = layer.blobs.add()
    blob.shape.dim.extend([2, 3])
    blob.data.extend([1, 2, 3, 4, 5, 6])
    path = tmp_path / "full.caffemodel"
    path.write_bytes(net.SerializeToString())
    np.testing.assert_array_equal(read_caffemodel(path).blobs("fc")[0], [[1, 2, 3], [4, 5, 6]])


@pytest.mark.parametrize("declaration", [
    'input: "data" input_shape { dim: 1 dim: 2 dim: 5 dim: 5 }',
    'input: "data" input_dim: 1 input_dim: 2 input_dim: 5 input_dim: 5',
    'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 2 dim: 5 dim: 5 } } }',
], ids=["input_shape", "input_dim", "Input"])
def test_input_declarations(declaration):
    net = parse_prototxt(declaration + '\nlayer { name: "r" type: "ReLU" bottom: "data" top: "r" }')
    plan = plan_net(net)
    assert plan.blob_shapes["data"] == (None, 2, 5, 5) and plan.outputs == ["r"]


def test_two_legacy_inputs_become_one_input_layer():
    net = parse_prototxt('input: "a" input: "b" ' + " ".join(f"input_dim: {d}" for d in (1, 2, 3, 3, 1, 2, 3, 3)) +
                         ' layer { name: "sum" type: "Eltwise" bottom: "a" bottom: "b" top: "sum" }')
    assert [(layer.name, list(layer.top)) for layer in net.net.layer] == [("input", ["a", "b"]), ("sum", ["sum"])]
    model = convert(net).model
    assert [tensor.name for tensor in model.inputs] == ["a", "b"]


def test_input_without_dims_takes_input_shape():
    net = parse_prototxt('input: "data" layer { name: "r" type: "ReLU" bottom: "data" top: "r" }')
    with pytest.raises(ConversionError, match=r"no shape in the prototxt; pass input_shape"):
        plan_net(net)
    assert plan_net(net, input_shape=(3, 4, 4)).blob_shapes["r"] == (None, 3, 4, 4)


PHASED = """input: "data" input_shape { dim: 1 dim: 2 }
layer { name: "train_only" type: "ReLU" bottom: "data" top: "t" include { phase: TRAIN } }
layer { name: "test_only" type: "ReLU" bottom: "data" top: "e" include { phase: TEST } }
layer { name: "not_test" type: "ReLU" bottom: "data" top: "n" exclude { phase: TEST } }
layer { name: "deploy_stage" type: "ReLU" bottom: "data" top: "d" include { stage: "deploy" } }
layer { name: "level2" type: "ReLU" bottom: "data" top: "l" include { min_level: 2 } }
"""


@pytest.mark.parametrize("state, phase, expected", [
    ("", "TEST", ["e"]),
    ("", "TRAIN", ["t", "n"]),
    ('state { stage: "deploy" level: 3 }', "TEST", ["e", "d", "l"]),
])
def test_phase_rules(state, phase, expected):
    plan = plan_net(parse_prototxt(state + "\n" + PHASED), phase=phase)
    assert plan.outputs == expected


def test_in_place_layers_get_blob_versions():
    plan = plan_net(parse_prototxt("""input: "data" input_shape { dim: 1 dim: 2 }
layer { name: "a" type: "ReLU" bottom: "data" top: "x" }
layer { name: "b" type: "Sigmoid" bottom: "x" top: "x" }
layer { name: "c" type: "TanH" bottom: "x" top: "x" }
layer { name: "sum" type: "Eltwise" bottom: "x" bottom: "data" top: "sum" }"""))
    layers = {layer.name: layer for layer in plan.layers}
    assert layers["b"].bottoms == ["x"] and layers["b"].tops == ["x#1"] and layers["b"].in_place
    assert layers["sum"].bottoms == ["x#2", "data"]
    assert plan.final_blob_ids()["x"] == "x#2"


def test_layers_missing_from_the_caffemodel_are_initialised_with_a_warning(tmp_path):
    text = """input: "data" input_shape { dim: 1 dim: 4 }
layer { name: "fc1" type: "InnerProduct" bottom: "data" top: "fc1" inner_product_param { num_output: 3 } }
layer { name: "fc2" type: "InnerProduct" bottom: "fc1" top: "fc2" inner_product_param { num_output: 2 } }"""
    prototxt, caffemodel = write_net(tmp_path, text, {"fc1": [np.ones((3, 4), np.float32), np.zeros(3, np.float32)],
                                                      "extra": [np.ones(2, np.float32)]})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_caffe_model(prototxt, caffemodel)
    assert any("no weights for ['fc2']" in str(w.message) for w in caught)
    np.testing.assert_array_equal(model.get_layer("fc1").get_weights()[0], np.ones((4, 3)))
    assert convert(prototxt, caffemodel).plan.unused_weights == ["extra"]
