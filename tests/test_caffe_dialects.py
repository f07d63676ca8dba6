"""Caffe fork dialects: fork-only fields and their numbers, dialect detection and defaults, solver files, and
binary caffemodels whose field 147 means SphereFace's margin_inner_product_param or BVLC's swish_param.

Field numbers and defaults are the ones in the forks' caffe.proto (happynear/caffe-windows 26628614,
wy1iu/sphereface tools/caffe-sphereface 966c44c9, BVLC/caffe); the caffemodels are encoded by hand below,
independently of the package's writer.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest

from converters.caffe import ConversionError, schema
from converters.caffe.reader import detect_dialect, parse_prototxt, read_caffemodel, read_prototxt
from tests.caffe_nets import SHARED, shared_missing

REAL_DIR = SHARED / "caffe" / "real"
REAL_MISSING = shared_missing(REAL_DIR, "the published Caffe prototxts")
REAL_FILES = sorted(path.name for path in REAL_DIR.glob("*.prototxt")) if REAL_DIR.is_dir() else []

# (message, field) -> (number, default) as happynear/caffe-windows' caffe.proto (26628614) declares them;
# None: no default (message fields, repeated fields, optional fields without one).
HAPPYNEAR_FIELDS = {
    ("LayerParameter", "inner_distance_param"): (213, None),
    ("LayerParameter", "general_contrastive_loss_param"): (215, None),
    ("LayerParameter", "general_triplet_loss_param"): (217, None),
    ("LayerParameter", "channel_scale_param"): (237, None),
    ("LayerParameter", "parameter_param"): (145, None),
    ("LayerParameter", "reduction_param"): (136, None),
    ("LayerParameter", "center_loss_param"): (211, None),
    ("LayerParameter", "label_specific_margin_param"): (236, None),
    ("SoftmaxParameter", "normalize_type"): (7, "Softmax"),
    ("SoftmaxParameter", "hard_ratio"): (3, 1.0),
    ("SoftmaxParameter", "label_smooth_factor"): (8, 0.0),
    ("AccuracyParameter", "min_is_better"): (4, False),
    ("ConvolutionParameter", "shape_offset"): (20, None),
    ("InnerDistanceParameter", "num_output"): (1, None),
    ("InnerDistanceParameter", "bias_term"): (2, True),
    ("InnerDistanceParameter", "weight_filler"): (3, None),
    ("InnerDistanceParameter", "distance_type"): (7, "L2"),
    ("InnerDistanceParameter", "normalize"): (8, False),
    ("InnerDistanceParameter", "update_center_only"): (9, False),
    ("GeneralContrastiveParameter", "positive_margin"): (1, 0.0),
    ("GeneralContrastiveParameter", "negative_margin"): (2, 1.0),
    ("GeneralContrastiveParameter", "max_negative_margin"): (14, 1.2),
    ("GeneralTripletParameter", "margin"): (1, 0.2),
    ("GeneralTripletParameter", "add_center_loss"): (2, True),
    ("ChannelScaleParameter", "do_forward"): (1, True),
    ("ChannelScaleParameter", "max_global_scale"): (5, 1000.0),
    ("ChannelScaleParameter", "init_global_scale"): (7, 1.0),
    ("ParameterParameter", "shape"): (1, None),
    ("ParameterParameter", "blob_filler"): (2, None),
    ("ReductionParameter", "operation"): (1, 1),
    ("ReductionParameter", "axis"): (2, 0),
    ("ReductionParameter", "coeff"): (3, 1.0),
    ("PoolingParameter", "blobs_a_min"): (14, 0.0001),
}

# BVLC SolverParameter (the same numbers in happynear's file).
SOLVER_FIELDS = {
    "net": 24, "net_param": 25, "train_net": 1, "test_net": 2, "train_net_param": 21, "test_net_param": 22,
    "train_state": 26, "test_state": 27, "test_iter": 3, "base_lr": 5, "solver_mode": 17, "random_seed": 20,
}


@pytest.mark.parametrize("message, field", sorted(HAPPYNEAR_FIELDS))
def test_fork_fields_have_the_forks_numbers_and_defaults(message, field):
    number, default = HAPPYNEAR_FIELDS[message, field]
    descriptor = schema.message_class(message).DESCRIPTOR.fields_by_name[field]
    assert descriptor.number == number
    if default is not None:
        assert getattr(schema.message_class(message)(), field) == pytest.approx(default)


def test_reduction_operation_enum_is_bvlcs():
    enum = schema.message_class("ReductionParameter").DESCRIPTOR.fields_by_name["operation"].enum_type
    assert {value.name: value.number for value in enum.values} == {"SUM": 1, "ASUM": 2, "SUMSQ": 3, "MEAN": 4}


@pytest.mark.parametrize("field", sorted(SOLVER_FIELDS))
def test_solver_fields_have_bvlcs_numbers(field):
    assert schema.SolverParameter.DESCRIPTOR.fields_by_name[field].number == SOLVER_FIELDS[field]


def test_every_dialect_table_entry_names_a_schema_field():
    for message, field in schema.FIELD_DIALECTS:
        assert field in schema.message_class(message).DESCRIPTOR.fields_by_name, (message, field)
    for dialect, table in schema.WIRE_RENUMBERING.items():
        assert dialect in schema.DIALECTS
        for (message, _), target in table.items():
            assert target is None or target in schema.message_class(message).DESCRIPTOR.fields_by_number


# ----------------------------------------------------------------------------------------------------
# Published prototxts
# ----------------------------------------------------------------------------------------------------

PUBLISHED_DIALECTS = {
    "happynear_AMSoftmax__prototxt__face_deploy_mirror_normalize.prototxt": "happynear",
    "happynear_AMSoftmax__prototxt__GNAP.prototxt": "happynear",
    "happynear_NormFace__prototxt__example_of_mirror_face.prototxt": "happynear",
    "wy1iu_sphereface__train__code__sphereface_model.prototxt": "sphereface",
    "wy1iu_sphereface__train__code__sphereface_deploy.prototxt": "bvlc",  # nothing fork-specific in it
    "KaimingHe_deep-residual-networks__prototxt__ResNet-50-deploy.prototxt": "bvlc",
    "BVLC_caffe__examples__mnist__lenet_consolidated_solver.prototxt": "bvlc",
}


@pytest.mark.skipif(not REAL_FILES, reason=REAL_MISSING)
@pytest.mark.parametrize("name", REAL_FILES)
def test_published_prototxt_has_no_unknown_fields(name):
    net = read_prototxt(REAL_DIR / name)
    assert [str(u) for u in net.unknown_fields] == []
    assert net.dialect in schema.DIALECTS and net.dialect_reason


@pytest.mark.skipif(not REAL_FILES, reason=REAL_MISSING)
@pytest.mark.parametrize("name", sorted(PUBLISHED_DIALECTS))
def test_published_prototxt_dialect(name):
    assert read_prototxt(REAL_DIR / name).dialect == PUBLISHED_DIALECTS[name]


@pytest.mark.skipif(not REAL_FILES, reason=REAL_MISSING)
def test_published_normface_fields_are_read_with_their_values():
    net = read_prototxt(REAL_DIR / "happynear_NormFace__prototxt__normalized_Euclidean_contrastive.prototxt").net
    distance = next(layer for layer in net.layer if layer.type == "InnerDistance").inner_distance_param
    assert (distance.num_output, distance.bias_term, distance.distance_type, distance.normalize) == \
        (10572, False, "L2", True)
    triplet = read_prototxt(REAL_DIR / "happynear_NormFace__prototxt__normalized_Euclidean_triplet.prototxt").net
    parameter = next(layer for layer in triplet.layer if layer.type == "Parameter").parameter_param
    assert list(parameter.shape.dim) == [10572, 512] and parameter.blob_filler.type == "gaussian_unitball"


@pytest.mark.skipif(not REAL_FILES, reason=REAL_MISSING)
def test_published_gnap_reduction_is_mean_over_axis_1():
    net = read_prototxt(REAL_DIR / "happynear_AMSoftmax__prototxt__GNAP.prototxt").net
    reduction = next(layer for layer in net.layer if layer.type == "Reduction").reduction_param
    assert (reduction.operation, reduction.axis, reduction.coeff) == (4, 1, 1.0)  # MEAN = 4


# ----------------------------------------------------------------------------------------------------
# Dialect detection and defaults (small hand-written nets)
# ----------------------------------------------------------------------------------------------------

INPUT = 'input: "data" input_dim: 1 input_dim: 4 input_dim: 1 input_dim: 1\n'


def _net(*layers: str) -> str:
    return INPUT + "\n".join(layers)


FLIP = 'layer { name: "flip" type: "Flip" bottom: "data" top: "flipped" }'
PLAIN_IP = 'layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc" inner_product_param { num_output: 2 } }'
NORMALIZED_IP = ('layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc" '
                 'inner_product_param { num_output: 2 normalize: true } }')
CLAMPED_SCALE = 'layer { name: "s" type: "Scale" bottom: "data" top: "s" scale_param { min_value: 0.01 } }'
SORT_ELTWISE = ('layer { name: "e" type: "Eltwise" bottom: "data" bottom: "data" top: "e" '
                'eltwise_param { operation: SORT } }')
MARGIN_IP = ('layer { name: "fc6" type: "MarginInnerProduct" bottom: "data" bottom: "label" top: "fc6" '
             'margin_inner_product_param { num_output: 10 type: QUADRUPLE base: 1000 gamma: 0.12 } }')
FLOOR_POOL = ('layer { name: "p" type: "Pooling" bottom: "data" top: "p" '
              'pooling_param { pool: MAX kernel_size: 1 round_mode: FLOOR } }')
BATCH_NORM = 'layer { name: "bn" type: "BatchNorm" bottom: "data" top: "data" }'


@pytest.mark.parametrize("layers, dialect, clue", [
    ((PLAIN_IP,), "bvlc", "no fork-specific"),
    ((FLIP,), "happynear", "Flip"),
    ((NORMALIZED_IP,), "happynear", "inner_product_param.normalize"),
    ((CLAMPED_SCALE,), "happynear", "scale_param.min_value"),
    ((SORT_ELTWISE,), "happynear", "SORT"),
    ((MARGIN_IP,), "sphereface", "MarginInnerProduct"),
    ((MARGIN_IP, FLIP), "happynear", "Flip"),
    ((FLOOR_POOL,), "bvlc", "round_mode"),
])
def test_dialect_is_detected_from_fork_only_types_and_fields(layers, dialect, clue):
    net = parse_prototxt(_net(*layers))
    assert net.dialect == dialect
    assert clue in net.dialect_reason


def test_conflicting_clues_are_reported():
    net = parse_prototxt(_net(FLIP, FLOOR_POOL))
    assert net.dialect == "happynear"  # one clue each (Flip: happynear only, round_mode: BVLC only): the fork wins
    assert "conflicting" in net.dialect_reason and "dialect=" in net.dialect_reason


def test_ssd_normalize_with_norm_param_is_not_a_happynear_clue():
    ssd = 'layer { name: "n" type: "Normalize" bottom: "data" top: "n" norm_param { across_spatial: false } }'
    net = parse_prototxt(_net(ssd))
    assert net.dialect == "bvlc"
    assert detect_dialect(parse_prototxt(_net(ssd.replace(" norm_param { across_spatial: false }", ""))).net)[0] == \
        "happynear"


def test_given_dialect_wins_over_detection():
    net = parse_prototxt(_net(FLIP, BATCH_NORM), dialect="BVLC")
    assert (net.dialect, net.dialect_reason) == ("bvlc", "given")


def test_moving_average_fraction_default_follows_the_dialect():
    happynear = parse_prototxt(_net(FLIP, BATCH_NORM))
    bvlc = parse_prototxt(_net(BATCH_NORM))
    assert schema.field_default(happynear, "BatchNormParameter", "moving_average_fraction") == 0.99
    assert schema.field_default(bvlc, "BatchNormParameter", "moving_average_fraction") == pytest.approx(0.999)
    assert schema.field_default("sphereface", "BatchNormParameter", "moving_average_fraction") == \
        pytest.approx(0.999)
    param = happynear.net.layer[-1].batch_norm_param
    assert schema.param_value(happynear, param, "moving_average_fraction") == 0.99
    param.moving_average_fraction = 0.5
    assert schema.param_value(happynear, param, "moving_average_fraction") == 0.5
    assert schema.field_default(None, "BatchNormParameter", "eps") == pytest.approx(1e-5)


def test_unknown_dialect_lists_the_valid_ones(tmp_path):
    with pytest.raises(ConversionError, match="'bvlc', 'happynear', 'sphereface'"):
        parse_prototxt(_net(PLAIN_IP), dialect="nvidia")
    prototxt = tmp_path / "net.prototxt"
    prototxt.write_text(_net(PLAIN_IP))
    with pytest.raises(ConversionError, match="unknown Caffe dialect 'ms'"):
        read_prototxt(prototxt, dialect="ms")
    with pytest.raises(ConversionError, match="unknown Caffe dialect"):
        schema.field_default("caffe2", "BatchNormParameter", "eps")
    with pytest.raises(ConversionError, match="has no field 'momentum'"):
        schema.field_default("bvlc", "BatchNormParameter", "momentum")


# ----------------------------------------------------------------------------------------------------
# Solver files
# ----------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not REAL_FILES, reason=REAL_MISSING)
def test_published_consolidated_solver_yields_its_inline_lenet():
    net = read_prototxt(REAL_DIR / "BVLC_caffe__examples__mnist__lenet_consolidated_solver.prototxt")
    assert (net.net.name, net.source_format, net.solver_net_field) == ("LeNet", "V1", "net_param")
    assert net.solver_test_stages == [["test-on-test-set"], ["test-on-train-set"]]
    types = [layer.type for layer in net.net.layer]
    assert types.count("Data") == 3 and types.count("Convolution") == 2 and "SoftmaxWithLoss" in types
    stages = [list(rule.stage) for layer in net.net.layer if layer.type == "Data" for rule in layer.include]
    assert stages == [[], ["test-on-test-set"], ["test-on-train-set"]]


SOLVER_HEAD = 'base_lr: 0.01\nlr_policy: "fixed"\nsolver_mode: CPU\n'


def test_solver_with_train_net_param_is_read():
    text = SOLVER_HEAD + ('test_state { stage: "val" }\ntrain_net_param { name: "tiny" ' + INPUT + PLAIN_IP +
                          ' layer { name: "r" type: "ReLU" bottom: "fc" top: "fc" bogus: 1 } }')
    net = parse_prototxt(text, "solver.prototxt")
    assert (net.net.name, net.solver_net_field, net.solver_test_stages) == ("tiny", "train_net_param", [["val"]])
    assert [layer.type for layer in net.net.layer] == ["Input", "InnerProduct", "ReLU"]
    assert [(u.path, u.layer, u.line) for u in net.unknown_fields] == [("train_net_param.layer[1].bogus", "r", 6)]


def test_solver_naming_a_net_file_asks_to_convert_that_file(tmp_path):
    solver = tmp_path / "lenet_solver.prototxt"
    solver.write_text(SOLVER_HEAD + 'net: "examples/mnist/lenet_train_test.prototxt"\ntest_iter: 100\n')
    with pytest.raises(ConversionError, match=r"solver.*'examples/mnist/lenet_train_test.prototxt'.*convert that"):
        read_prototxt(solver)


def test_solver_with_two_train_nets_is_refused():
    text = SOLVER_HEAD + 'net: "a.prototxt"\nnet_param { name: "b" }\n'
    with pytest.raises(ConversionError, match="exactly one of"):
        parse_prototxt(text, "solver.prototxt")


def test_net_with_a_debug_info_field_is_not_a_solver():
    net = parse_prototxt("debug_info: true\n" + _net(PLAIN_IP))
    assert net.solver_net_field is None and net.solver_test_stages is None


# ----------------------------------------------------------------------------------------------------
# Binary caffemodels written by the forks (protobuf wire format encoded by hand)
# ----------------------------------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _len(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _int(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value)


def _float(number: int, value: float) -> bytes:
    return _varint(number << 3 | 5) + struct.pack("<f", value)


def _str(number: int, text: str) -> bytes:
    return _len(number, text.encode())


def _blob(array: np.ndarray) -> bytes:
    """BlobProto: shape (7) { dim (1, packed) }, data (5, packed float)."""
    dims = b"".join(_varint(dim) for dim in array.shape)
    return _len(7, _len(1, dims)) + _len(5, array.astype("<f4").tobytes())


def _layer(name: str, layer_type: str, params: bytes, blobs=()) -> bytes:
    """NetParameter.layer (100) entry: name 1, type 2, bottom 3, top 4, blobs 7, then the *_param bytes."""
    body = _str(1, name) + _str(2, layer_type) + _str(3, "data") + _str(4, name)
    body += b"".join(_len(7, _blob(array)) for array in blobs) + params
    return _len(100, body)


# SphereFace's MarginInnerProductParameter: num_output 1, type 2 (QUADRUPLE = 3), weight_filler 3, base 5,
# gamma 6, power 7, lambda_min 9 (tools/caffe-sphereface caffe.proto); field 147 of its LayerParameter.
SPHEREFACE_MARGIN = (_int(1, 3) + _int(2, 3) + _len(3, _str(1, "xavier")) + _float(5, 1000.0) + _float(6, 0.12)
                     + _float(7, 1.0) + _float(9, 5.0))
FC6_WEIGHTS = np.arange(12, dtype=np.float32).reshape(3, 4) / 8


def _write(tmp_path, name: str, *layers: bytes):
    path = tmp_path / name
    path.write_bytes(_str(1, "net") + b"".join(layers))
    return path


def test_sphereface_caffemodel_blobs_read_whatever_field_147_means(tmp_path):
    path = _write(tmp_path, "sphereface.caffemodel",
                  _layer("fc6", "MarginInnerProduct", _len(147, SPHEREFACE_MARGIN), [FC6_WEIGHTS]))
    model = read_caffemodel(path)
    assert (model.dialect, model.names()) == ("sphereface", ["fc6"])
    assert "147" in model.dialect_reason
    np.testing.assert_array_equal(model.blobs("fc6")[0], FC6_WEIGHTS)
    np.testing.assert_array_equal(read_caffemodel(path, dialect="bvlc").blobs("fc6")[0], FC6_WEIGHTS)


def test_sphereface_caffemodel_parameters_read_with_its_numbering(tmp_path):
    path = _write(tmp_path, "sphereface.caffemodel",
                  _layer("fc6", "MarginInnerProduct", _len(147, SPHEREFACE_MARGIN), [FC6_WEIGHTS]))
    layer = read_caffemodel(path).layer_parameter("fc6")
    margin = layer.margin_inner_product_param
    assert (layer.name, layer.type, list(layer.bottom), len(layer.blobs)) == ("fc6", "MarginInnerProduct", ["data"], 0)
    assert (margin.num_output, margin.type, margin.weight_filler.type) == (3, 3, "xavier")
    assert (margin.base, margin.gamma, margin.power, margin.lambda_min) == pytest.approx((1000.0, 0.12, 1.0, 5.0))
    assert not layer.HasField("swish_param")


def test_sphereface_caffemodel_read_as_bvlc_names_the_field_and_the_dialect(tmp_path):
    path = _write(tmp_path, "sphereface.caffemodel",
                  _layer("fc6", "MarginInnerProduct", _len(147, SPHEREFACE_MARGIN), [FC6_WEIGHTS]))
    with pytest.raises(ConversionError) as error:
        read_caffemodel(path).layer_parameter("fc6", dialect="bvlc")
    message = str(error.value)
    assert "layer 'fc6'" in message and "swish_param" in message and "field 1" in message
    assert "sphereface" in message and "margin_inner_product_param" in message


def test_field_147_read_as_happynear_which_lacks_it_is_refused_with_both_meanings(tmp_path):
    path = _write(tmp_path, "sphereface.caffemodel",
                  _layer("fc6", "MarginInnerProduct", _len(147, SPHEREFACE_MARGIN), [FC6_WEIGHTS]))
    with pytest.raises(ConversionError, match=r"field 147 of LayerParameter is not in happynear's") as error:
        read_caffemodel(path).layer_parameter("fc6", dialect="happynear")
    assert "swish_param" in str(error.value) and "dialect='sphereface'" in str(error.value)


def test_bvlc_swish_caffemodel_reads_147_as_swish(tmp_path):
    weights = np.ones((2, 4), np.float32)
    path = _write(tmp_path, "swish.caffemodel",
                  _layer("fc", "InnerProduct", _len(117, _int(1, 2)), [weights]),
                  _layer("swish", "Swish", _len(147, _float(1, 1.5))))
    model = read_caffemodel(path)
    assert model.dialect == "bvlc" and "swish" in model.dialect_reason
    np.testing.assert_array_equal(model.blobs("fc")[0], weights)
    assert model.blobs("swish") == []
    assert model.layer_parameter("swish").swish_param.beta == 1.5
    assert model.layer_parameter("fc").inner_product_param.num_output == 2
    with pytest.raises(ConversionError, match="bvlc's caffe.proto uses LayerParameter field 147 for swish_param"):
        model.layer_parameter("swish", dialect="sphereface")


def test_happynear_pooling_blobs_lr_at_13_is_dropped_not_read_as_round_mode(tmp_path):
    # happynear's PoolingParameter: pool 1, kernel_size 2, stride 3, blobs_lr 13 (float); 214 = normalize_param.
    pooling = _len(121, _int(1, 1) + _int(2, 2) + _int(3, 2) + _float(13, 0.5))
    path = _write(tmp_path, "happynear.caffemodel",
                  _layer("pool", "Pooling", pooling),
                  _layer("norm", "Normalize", _len(214, _str(1, "L2"))))
    model = read_caffemodel(path)
    assert model.dialect == "happynear" and "214" in model.dialect_reason
    param = model.layer_parameter("pool").pooling_param
    assert (param.pool, param.kernel_size, param.stride, param.HasField("round_mode")) == (1, 2, 2, False)
    assert model.layer_parameter("norm").normalize_param.normalize_type == "L2"
    with pytest.raises(ConversionError, match=r"pooling_param\.round_mode \(field 13\).*happynear"):
        model.layer_parameter("pool", dialect="bvlc")


def test_caffemodel_with_unknown_dialect_is_refused(tmp_path):
    path = _write(tmp_path, "x.caffemodel", _layer("fc", "InnerProduct", b"", [FC6_WEIGHTS]))
    with pytest.raises(ConversionError, match="'bvlc', 'happynear', 'sphereface'"):
        read_caffemodel(path, dialect="caffe-ssd")
    with pytest.raises(ConversionError, match="unknown Caffe dialect"):
        read_caffemodel(path).layer_parameter("fc", dialect="ssd")
