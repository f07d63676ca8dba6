"""Every user error is a ConversionError naming the file or layer and the fix; absurd sizes are refused
before anything is allocated; users can register a handler for a type the converter does not know."""

from __future__ import annotations

import os

import keras
import numpy as np
import pytest

from converters.caffe import Built, ConversionError, Handler, convert, read_caffemodel, register, write_caffemodel
from converters.caffe.reader import MAX_CAFFEMODEL_BYTES, parse_prototxt
from converters.caffe.registry import unregister
from tests.caffe_nets import write_net

CONV_NET = """input: "data" input_shape { dim: 1 dim: 3 dim: 8 dim: 8 }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 4 kernel_size: 3 } }
"""
CONV_BLOBS = {"conv1": [np.ones((4, 3, 3, 3), np.float32), np.zeros(4, np.float32)]}


def test_truncated_caffemodel(tmp_path):
    prototxt, caffemodel = write_net(tmp_path, CONV_NET, CONV_BLOBS)
    data = caffemodel.read_bytes()
    caffemodel.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match=r"truncated caffemodel: a field at byte \d+ claims \d+ bytes"):
        convert(prototxt, caffemodel)


@pytest.mark.parametrize("content", [b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, b"PK\x03\x04" + bytes(200)],
                         ids=["png", "zip"])
def test_foreign_file_as_caffemodel(tmp_path, content):
    prototxt, _ = write_net(tmp_path, CONV_NET)
    foreign = tmp_path / "foreign.caffemodel"
    foreign.write_bytes(content)
    with pytest.raises(ConversionError, match="not a Caffe caffemodel"):
        convert(prototxt, foreign)


def test_swapped_arguments_are_named(tmp_path):
    prototxt, caffemodel = write_net(tmp_path, CONV_NET, CONV_BLOBS)
    with pytest.raises(ConversionError, match="this is a text file, not a binary caffemodel"):
        read_caffemodel(prototxt)
    with pytest.raises(ConversionError, match="this is a binary file, not a text prototxt"):
        convert(caffemodel, prototxt)


def test_missing_file(tmp_path):
    with pytest.raises(ConversionError, match="no such prototxt file"):
        convert(tmp_path / "absent.prototxt")


def test_blob_shape_that_disagrees_with_the_prototxt(tmp_path):
    prototxt, caffemodel = write_net(tmp_path, CONV_NET, {"conv1": [np.ones((8, 3, 3, 3), np.float32),
                                                                    np.zeros(8, np.float32)]})
    with pytest.raises(ConversionError) as caught:
        convert(prototxt, caffemodel)
    assert caught.value.layer == "conv1"
    assert str(caught.value).startswith("layer 'conv1' (Convolution): blob 0 in the caffemodel has shape (8, 3, 3, 3), "
                                        "but the prototxt implies (4, 3, 3, 3)")


def test_blob_count_that_disagrees_with_the_prototxt(tmp_path):
    prototxt, caffemodel = write_net(tmp_path, CONV_NET, {"conv1": [np.ones((4, 3, 3, 3), np.float32)]})
    with pytest.raises(ConversionError, match=r"layer 'conv1' \(Convolution\): the caffemodel has 1 blobs for it, "
                                              r"the prototxt implies 2"):
        convert(prototxt, caffemodel)


def test_unknown_layer_types_are_all_listed_with_how_to_register(tmp_path):
    text = CONV_NET + """layer { name: "act" type: "Mish" bottom: "conv1" top: "act" }
layer { name: "roi" type: "ROIPooling" bottom: "act" top: "roi" }"""
    prototxt, _ = write_net(tmp_path, text)
    with pytest.raises(ConversionError) as caught:
        convert(prototxt)
    message = str(caught.value)
    assert caught.value.layer == "act"
    assert "no handler for 2 layer(s): 'act' (type 'Mish'), 'roi' (type 'ROIPooling')" in message
    assert '@register("Mish")' in message


def test_a_registered_handler_converts_a_custom_type(tmp_path):
    @register("Mish")
    class MishHandler(Handler):
        def build(self, ctx, layer, inputs, weights):
            mish = keras.layers.Activation(keras.activations.mish, name=ctx.name(layer))
            return Built([mish(inputs[0])])

    try:
        prototxt, _ = write_net(tmp_path, 'input: "data" input_shape { dim: 1 dim: 3 }\n'
                                          'layer { name: "act" type: "Mish" bottom: "data" top: "act" }')
        model = convert(prototxt).model
        x = np.array([[-1.0, 0.0, 2.0]], np.float32)
        np.testing.assert_allclose(np.asarray(model(x)), x * np.tanh(np.log1p(np.exp(x))), rtol=1e-6)
        with pytest.raises(ValueError, match="already has a handler"):
            register("Mish")(MishHandler)
    finally:
        unregister("Mish")


@pytest.mark.parametrize("text, message", [
    ('layer { name: "relu" type: "ReLU" bottom: "nowhere" top: "relu" }',
     "layer 'relu' (ReLU): bottom 'nowhere' is not available: no layer before it produces it"),
    ('layer { name: "train_data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 2 } }\n'
     '        include { phase: TRAIN } }\n'
     'layer { name: "relu" type: "ReLU" bottom: "data" top: "relu" }',
     "bottom 'data' is not available: it comes from layer(s) 'train_data' (Input), which phase TEST excludes; "
     "try the other --phase"),
    ('input: "data" input_shape { dim: 1 dim: 2 }\n'
     'layer { name: "loss" type: "EuclideanLoss" bottom: "data" bottom: "data" top: "loss" }\n'
     'layer { name: "relu" type: "ReLU" bottom: "loss" top: "relu" }',
     "bottom 'loss' is not available: it comes from layer 'loss' (EuclideanLoss), which is training-only"),
], ids=["nowhere", "other-phase", "dropped"])
def test_bottom_that_no_layer_produces(text, message):
    with pytest.raises(ConversionError) as caught:
        convert(parse_prototxt(text))
    assert message in str(caught.value) and caught.value.layer == "relu"


def test_caffemodel_blob_claiming_an_absurd_shape_is_refused_before_allocation(tmp_path):
    from converters.caffe import schema

    net = schema.NetParameter()
    layer = net.layer.add(name="conv1", type="Convolution")
    blob = layer.blobs.add()
    blob.shape.dim.extend([10**6, 10**6, 10**6])  # 10^18 floats claimed, 3 held
    blob.data.extend([1.0, 2.0, 3.0])
    path = tmp_path / "absurd.caffemodel"
    path.write_bytes(net.SerializeToString())
    prototxt, _ = write_net(tmp_path, CONV_NET)
    with pytest.raises(ConversionError, match=r"claims shape \(1000000, 1000000, 1000000\) "
                                              r"\(1000000000000000000 values\) but holds 3 values"):
        convert(prototxt, path)


def test_prototxt_implying_absurd_sizes_is_refused_before_allocation(tmp_path):
    huge_layer = CONV_NET.replace("num_output: 4", "num_output: 2000000000")
    with pytest.raises(ConversionError, match=r"top 'conv1' would have shape .* refusing so absurd a blob"):
        convert(parse_prototxt(huge_layer))
    beyond_int32 = CONV_NET.replace("num_output: 4", "num_output: 4000000000")
    with pytest.raises(ConversionError, match=r"convolution_param.num_output: 4000000000 is beyond the int32 range"):
        convert(parse_prototxt(beyond_int32))
    huge_weights = ('input: "data" input_dim: 1 input_dim: 3 input_dim: 8 input_dim: 8\n'
                    'layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc" '
                    'inner_product_param { num_output: 200000000 } }')
    with pytest.raises(ConversionError, match=r"implies 38,600,000,000 parameters .* refusing"):
        convert(parse_prototxt(huge_weights))
    huge_input = 'input: "data" input_shape { dim: 1 dim: 3 dim: 100000000 dim: 100000 }\n' + CONV_NET.split("\n", 1)[1]
    with pytest.raises(ConversionError, match="per sample; refusing so absurd a size"):
        convert(parse_prototxt(huge_input))


def test_caffemodel_larger_than_caffe_can_read_is_refused_unread(tmp_path):
    path = tmp_path / "huge.caffemodel"
    with open(path, "wb") as handle:  # sparse: no disk space used, and the reader must not read it
        handle.truncate(MAX_CAFFEMODEL_BYTES + 1)
    with pytest.raises(ConversionError, match="exceeds the 2 GiB that Caffe itself can read"):
        read_caffemodel(path)
    os.remove(path)


@pytest.mark.parametrize("text, message", [
    ('layers { layer { name: "conv" type: "conv" } }', r"V0 \(2013\) net"),
    ('layer { name: "a" type: "ReLU" } layers { name: "b" type: RELU }', "both current 'layer' and V1 'layers'"),
    ('layer { name: "a" type: "ReLU" bottom: "x" ', "not a valid Caffe prototxt"),
    ('input: "data" input_dim: 1 input_dim: 2', "1 net inputs need 4 input_dim values"),
    ('layer { name: "a" type: "ReLU" include { phase: TEST } exclude { phase: TRAIN } }', "both include and exclude"),
])
def test_malformed_nets(text, message):
    with pytest.raises(ConversionError, match=message):
        convert(parse_prototxt(text))


def test_phase_must_be_test_or_train():
    with pytest.raises(ConversionError, match="phase must be 'TEST'"):
        convert(parse_prototxt(CONV_NET), phase="deploy")


def test_data_layer_without_image_size_asks_for_input_shape():
    text = ('layer { name: "data" type: "ImageData" top: "data" top: "label" image_data_param { source: "x" } }\n'
            'layer { name: "relu" type: "ReLU" bottom: "data" top: "relu" }')
    with pytest.raises(ConversionError, match=r"layer 'data' \(ImageData\): the prototxt does not say the input image "
                                              r"size .* pass input_shape=\(C, H, W\)"):
        convert(parse_prototxt(text))
    assert convert(parse_prototxt(text), input_shape=(3, 6, 5)).model.input_shape == (None, 6, 5, 3)


def test_ssd_normalize_is_not_mistaken_for_the_l2_normalize(tmp_path):
    text = ('input: "data" input_shape { dim: 1 dim: 3 dim: 4 dim: 4 }\n'
            'layer { name: "norm" type: "Normalize" bottom: "data" top: "norm" norm_param { across_spatial: false } }')
    with pytest.raises(ConversionError, match="SSD's NormalizeBBox"):
        convert(parse_prototxt(text))
    prototxt, caffemodel = write_net(tmp_path, text.replace(" norm_param { across_spatial: false }", ""),
                                     {"norm": [np.ones(3, np.float32)]})
    with pytest.raises(ConversionError, match="has 1 blobs for it, the prototxt implies 0.*NormalizeBBox"):
        convert(prototxt, caffemodel)


def test_writer_refuses_unknown_v1_types(tmp_path):
    with pytest.raises(ValueError, match="no V1 enum value"):
        write_caffemodel(tmp_path / "x.caffemodel", [("a", "PReLU", [])], v1=True)
