"""Read stage, part 1: our own protobuf schema for the subset of caffe.proto the converter needs.

It owns the message classes (``NetParameter``, ``LayerParameter``, ``V1LayerParameter``, ``BlobProto``...),
built at import time from descriptors, with the field numbers of BVLC caffe.proto
(https://github.com/BVLC/caffe, ``src/caffe/proto/caffe.proto``) plus the fields of the happynear fork used by
AM-Softmax and NormFace (https://github.com/happynear/caffe-windows, branch ``ms``,
``src/caffe/proto/caffe.proto``) and SphereFace's ``MarginInnerProduct``
(https://github.com/wy1iu/sphereface, ``tools/caffe-sphereface/src/caffe/proto/caffe.proto``).

Why descriptors built at import (``descriptor_pb2`` + ``message_factory``) rather than checked-in
``*_pb2.py`` code: generated code is tied to the protoc version that wrote it (protobuf 4, 5, 6 and 7
each refuse or warn on code from a much older or newer gencode), so a checked-in file would pin the
runtime the package can use; descriptors built here work with every runtime the package allows
(protobuf >= 4.25), need no protoc, and the schema stays one readable table in this file.

Dialects. The three caffe.proto files disagree in a few places; ``DIALECTS`` names them and the tables below
say where (``FIELD_DIALECTS``: fields only some forks declare; ``DIALECT_DEFAULTS``: defaults that differ;
``WIRE_RENUMBERING``: binary field numbers that mean another field in a fork). ``field_default`` answers
"this field's default for this net". The reader picks a net's dialect (``CaffeNet.dialect``).

- ``margin_inner_product_param`` is 232 (happynear) here; SphereFace's fork uses 147, which BVLC uses for
  ``swish_param``. Text prototxts name fields, so both parse; a binary caffemodel's weights are read through
  the ``LayerBlobs`` view (name, type, blobs), which never looks at 147; its hyper-parameters, when asked
  for (``Caffemodel.layer_parameter``), are renumbered per dialect and checked field by field.
- ``PoolingParameter`` field 13 is BVLC ``round_mode`` and happynear's ``blobs_lr`` (a float, training
  only); OpenCV's ``ceil_mode`` (also 13 there) is declared at 1013, a text-only alias.
- ``BatchNormParameter.moving_average_fraction`` defaults to 0.999 in BVLC and SphereFace, 0.99 in happynear.

Sources read (field numbers and defaults below are theirs; nothing is guessed):

| dialect | repository, file | commit |
| --- | --- | --- |
| bvlc | BVLC/caffe ``src/caffe/proto/caffe.proto`` | 9b891540 (caffe_format.md); SolverParameter also 8a65ae31 |
| happynear | happynear/caffe-windows ``src/caffe/proto/caffe.proto`` (ms era, up to field 241) | 26628614 |
| sphereface | wy1iu/sphereface ``tools/caffe-sphereface/src/caffe/proto/caffe.proto`` | 966c44c9 |

Messages live in a private ``DescriptorPool`` (package ``keras_margin.caffe``), so they never clash with
another ``caffe_pb2`` loaded in the same process.

Example:
>>> from converters.caffe import schema
>>> net = schema.NetParameter(name="tiny")
>>> layer = net.layer.add(name="conv1", type="Convolution")
>>> layer.convolution_param.num_output = 8
>>> schema.NetParameter.FromString(net.SerializeToString()).layer[0].convolution_param.bias_term
True
"""

from __future__ import annotations

import re
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from converters.caffe.errors import ConversionError

__all__ = [
    "PACKAGE",
    "message_class",
    "NetParameter",
    "LayerParameter",
    "V1LayerParameter",
    "BlobProto",
    "BlobShape",
    "NetState",
    "NetStateRule",
    "ParamSpec",
    "FillerParameter",
    "LayerBlobs",
    "V1LayerBlobs",
    "V1_LAYER_TYPES",
    "SolverParameter",
    "DIALECTS",
    "DIALECT_SOURCES",
    "DIALECT_DEFAULTS",
    "FIELD_DIALECTS",
    "ENUM_VALUE_DIALECTS",
    "LAYER_TYPE_DIALECTS",
    "WIRE_RENUMBERING",
    "check_dialect",
    "field_default",
    "param_value",
]

PACKAGE = "keras_margin.caffe"

# Enums: "Message.Enum" nests the enum in that message (as caffe.proto does); a bare name is top-level.
_ENUMS: dict[str, str] = {
    "Phase": "TRAIN=0 TEST=1",
    "BlobProto.RawType": "DOUBLE=0 FLOAT=1 FLOAT16=2 INT=3 UINT=4",  # OpenCV / NVIDIA raw_data_type
    "ParamSpec.DimCheckMode": "STRICT=0 PERMISSIVE=1",
    "FillerParameter.VarianceNorm": "FAN_IN=0 FAN_OUT=1 AVERAGE=2",
    "LossParameter.NormalizationMode": "FULL=0 VALID=1 BATCH_SIZE=2 NONE=3",
    "ConvolutionParameter.Engine": "DEFAULT=0 CAFFE=1 CUDNN=2",
    "ConvolutionParameter.CuDNNConvolutionAlgorithmSeeker": "GET=0 FINDEX=1",  # happynear
    "DataParameter.DB": "LEVELDB=0 LMDB=1",
    "EltwiseParameter.EltwiseOp": "PROD=0 SUM=1 MAX=2 SORT=3",  # SORT: happynear
    "HingeLossParameter.Norm": "L1=1 L2=2",
    "LRNParameter.NormRegion": "ACROSS_CHANNELS=0 WITHIN_CHANNEL=1",
    "LRNParameter.Engine": "DEFAULT=0 CAFFE=1 CUDNN=2",
    # DEF..LOWRES: happynear's extra pooling methods (they carry a blob; not convertible).
    "PoolingParameter.PoolMethod": "MAX=0 AVE=1 STOCHASTIC=2 DEF=3 DEF_ALL=4 DEF_ALL2=5 DEF_ALL3=6 DEF_ALL4=7 LOWRES=8",
    "PoolingParameter.Engine": "DEFAULT=0 CAFFE=1 CUDNN=2",
    "PoolingParameter.RoundMode": "CEIL=0 FLOOR=1",
    "ReductionParameter.ReductionOp": "SUM=1 ASUM=2 SUMSQ=3 MEAN=4",
    "ReLUParameter.Engine": "DEFAULT=0 CAFFE=1 CUDNN=2",
    "SigmoidParameter.Engine": "DEFAULT=0 CAFFE=1 CUDNN=2",
    "SoftmaxParameter.Engine": "DEFAULT=0 CAFFE=1 CUDNN=2",
    "TanHParameter.Engine": "DEFAULT=0 CAFFE=1 CUDNN=2",
    "BatchNormParameter.Engine": "DEFAULT=0 CAFFE=1 CUDNN=2",
    "MarginInnerProductParameter.MarginType": "SINGLE=0 DOUBLE=1 TRIPLE=2 QUADRUPLE=3",
    "LargeMarginInnerProductParameter.LargeMarginType": "SINGLE=0 DOUBLE=1 TRIPLE=2 QUADRUPLE=3",  # happynear
    "LabelSpecificMarginParameter.MarginType": "HARD=0 SOFT=1",  # happynear
    "SolverParameter.SnapshotFormat": "HDF5=0 BINARYPROTO=1",
    "SolverParameter.SolverMode": "CPU=0 GPU=1",
    "SolverParameter.SolverType": "SGD=0 NESTEROV=1 ADAGRAD=2 RMSPROP=3 ADADELTA=4 ADAM=5",
    "V1LayerParameter.DimCheckMode": "STRICT=0 PERMISSIVE=1",
    # BVLC UpgradeV1LayerType table, plus happynear's additions 41-48.
    "V1LayerParameter.LayerType": (
        "NONE=0 ABSVAL=35 ACCURACY=1 ARGMAX=30 BNLL=2 CONCAT=3 CONTRASTIVE_LOSS=37 CONVOLUTION=4 DATA=5 "
        "DECONVOLUTION=39 DROPOUT=6 DUMMY_DATA=32 EUCLIDEAN_LOSS=7 ELTWISE=25 EXP=38 FLATTEN=8 HDF5_DATA=9 "
        "HDF5_OUTPUT=10 HINGE_LOSS=28 IM2COL=11 IMAGE_DATA=12 INFOGAIN_LOSS=13 INNER_PRODUCT=14 LRN=15 "
        "MEMORY_DATA=29 MULTINOMIAL_LOGISTIC_LOSS=16 MVN=34 POOLING=17 POWER=26 RELU=18 SIGMOID=19 "
        "SIGMOID_CROSS_ENTROPY_LOSS=27 SILENCE=36 SOFTMAX=20 SOFTMAX_LOSS=21 SPLIT=22 SLICE=33 TANH=23 "
        "WINDOW_DATA=24 THRESHOLD=31 LOCAL=41 BN=42 NORMALIZE=43 INSANITY=44 TRIPLET_LOSS=45 ROIPOOLING=46 "
        "BATCH_NORM=47 ELTWISE_AFFINE=48"
    ),
}

# Messages: one field per line, "label type name = number [default=...] [packed]".
_MESSAGES: dict[str, str] = {
    "BlobShape": "repeated int64 dim = 1 [packed]",
    "BlobProto": """
        optional BlobShape shape = 7
        repeated float data = 5 [packed]
        repeated float diff = 6 [packed]
        repeated double double_data = 8 [packed]
        repeated double double_diff = 9 [packed]
        optional RawType raw_data_type = 10
        optional bytes raw_data = 12
        optional int32 num = 1 [default=0]
        optional int32 channels = 2 [default=0]
        optional int32 height = 3 [default=0]
        optional int32 width = 4 [default=0]
    """,
    "BlobProtoVector": "repeated BlobProto blobs = 1",
    "NetState": """
        optional Phase phase = 1 [default=TEST]
        optional int32 level = 2 [default=0]
        repeated string stage = 3
    """,
    "NetStateRule": """
        optional Phase phase = 1
        optional int32 min_level = 2
        optional int32 max_level = 3
        repeated string stage = 4
        repeated string not_stage = 5
    """,
    "ParamSpec": """
        optional string name = 1
        optional DimCheckMode share_mode = 2
        optional float lr_mult = 3 [default=1.0]
        optional float decay_mult = 4 [default=1.0]
    """,
    "FillerParameter": """
        optional string type = 1 [default=constant]
        optional float value = 2 [default=0]
        optional float min = 3 [default=0]
        optional float max = 4 [default=1]
        optional float mean = 5 [default=0]
        optional float std = 6 [default=1]
        optional int32 sparse = 7 [default=-1]
        optional VarianceNorm variance_norm = 8 [default=FAN_IN]
        optional float alpha = 9
    """,
    "NetParameter": """
        optional string name = 1
        repeated string input = 3
        repeated BlobShape input_shape = 8
        repeated int32 input_dim = 4
        optional bool force_backward = 5 [default=false]
        optional NetState state = 6
        optional bool debug_info = 7 [default=false]
        repeated LayerParameter layer = 100
        repeated V1LayerParameter layers = 2
    """,
    "LayerParameter": """
        optional string name = 1
        optional string type = 2
        repeated string bottom = 3
        repeated string top = 4
        optional Phase phase = 10
        repeated float loss_weight = 5
        repeated ParamSpec param = 6
        repeated BlobProto blobs = 7
        repeated bool propagate_down = 11
        repeated NetStateRule include = 8
        repeated NetStateRule exclude = 9
        optional TransformationParameter transform_param = 100
        optional LossParameter loss_param = 101
        optional AccuracyParameter accuracy_param = 102
        optional ArgMaxParameter argmax_param = 103
        optional BatchNormParameter batch_norm_param = 139
        optional BiasParameter bias_param = 141
        optional ClipParameter clip_param = 148
        optional ConcatParameter concat_param = 104
        optional ContrastiveLossParameter contrastive_loss_param = 105
        optional ConvolutionParameter convolution_param = 106
        optional CropParameter crop_param = 144
        optional DataParameter data_param = 107
        optional DropoutParameter dropout_param = 108
        optional DummyDataParameter dummy_data_param = 109
        optional EltwiseParameter eltwise_param = 110
        optional ELUParameter elu_param = 140
        optional ExpParameter exp_param = 111
        optional FlattenParameter flatten_param = 135
        optional HDF5DataParameter hdf5_data_param = 112
        optional HDF5OutputParameter hdf5_output_param = 113
        optional HingeLossParameter hinge_loss_param = 114
        optional ImageDataParameter image_data_param = 115
        optional InfogainLossParameter infogain_loss_param = 116
        optional InnerProductParameter inner_product_param = 117
        optional InputParameter input_param = 143
        optional LogParameter log_param = 134
        optional LRNParameter lrn_param = 118
        optional MemoryDataParameter memory_data_param = 119
        optional MVNParameter mvn_param = 120
        optional ParameterParameter parameter_param = 145
        optional PoolingParameter pooling_param = 121
        optional PowerParameter power_param = 122
        optional PReLUParameter prelu_param = 131
        optional PythonParameter python_param = 130
        optional ReductionParameter reduction_param = 136
        optional ReLUParameter relu_param = 123
        optional ReshapeParameter reshape_param = 133
        optional ScaleParameter scale_param = 142
        optional SigmoidParameter sigmoid_param = 124
        optional SoftmaxParameter softmax_param = 125
        optional SliceParameter slice_param = 126
        optional SwishParameter swish_param = 147
        optional TanHParameter tanh_param = 127
        optional ThresholdParameter threshold_param = 128
        optional TileParameter tile_param = 138
        optional CenterLossParameter center_loss_param = 211
        optional FlipParameter flip_param = 212
        optional InnerDistanceParameter inner_distance_param = 213
        optional NormalizeParameter normalize_param = 214
        optional GeneralContrastiveParameter general_contrastive_loss_param = 215
        optional SoftContrastiveParameter soft_contrastive_loss_param = 216
        optional GeneralTripletParameter general_triplet_loss_param = 217
        optional LargeMarginInnerProductParameter largemargin_inner_product_param = 227
        optional LabelSpecificRescaleParameter label_specific_rescale_param = 228
        optional MarginInnerProductParameter margin_inner_product_param = 232
        optional LabelSpecificMarginParameter label_specific_margin_param = 236
        optional ChannelScaleParameter channel_scale_param = 237
        optional LabelSpecificAffineParameter label_specific_affine_param = 238
        optional LabelSpecificHardMarginParameter label_specific_hard_margin_param = 239
        optional LabelSpecificAddParameter label_specific_add_param = 241
    """,
    "TransformationParameter": """
        optional float scale = 1 [default=1]
        optional bool mirror = 2 [default=false]
        optional uint32 crop_size = 3 [default=0]
        optional string mean_file = 4
        repeated float mean_value = 5
        optional bool force_color = 6 [default=false]
        optional bool force_gray = 7 [default=false]
        optional uint32 crop_h = 8 [default=0]
        optional uint32 crop_w = 9 [default=0]
        optional bool center_crop = 10 [default=false]
        optional float erase_ratio = 11 [default=0]
        optional float scale_min = 12 [default=0.02]
        optional float scale_max = 13 [default=0.4]
        optional float aspect_min = 14 [default=0.33]
        optional float aspect_max = 15 [default=3]
    """,
    "LossParameter": """
        optional int32 ignore_label = 1
        optional NormalizationMode normalization = 3 [default=VALID]
        optional bool normalize = 2
    """,
    "AccuracyParameter": """
        optional uint32 top_k = 1 [default=1]
        optional int32 axis = 2 [default=1]
        optional int32 ignore_label = 3
        optional bool min_is_better = 4 [default=false]
    """,
    "ArgMaxParameter": """
        optional bool out_max_val = 1 [default=false]
        optional uint32 top_k = 2 [default=1]
        optional int32 axis = 3
    """,
    "ClipParameter": """
        optional float min = 1
        optional float max = 2
    """,
    "ConcatParameter": """
        optional int32 axis = 2 [default=1]
        optional uint32 concat_dim = 1 [default=1]
    """,
    "ContrastiveLossParameter": """
        optional float margin = 1 [default=1.0]
        optional bool legacy_version = 2 [default=false]
    """,
    "ConvolutionParameter": """
        optional uint32 num_output = 1
        optional bool bias_term = 2 [default=true]
        repeated uint32 pad = 3
        repeated uint32 kernel_size = 4
        repeated uint32 stride = 6
        repeated uint32 dilation = 18
        optional uint32 pad_h = 9 [default=0]
        optional uint32 pad_w = 10 [default=0]
        optional uint32 kernel_h = 11
        optional uint32 kernel_w = 12
        optional uint32 stride_h = 13
        optional uint32 stride_w = 14
        optional uint32 group = 5 [default=1]
        optional FillerParameter weight_filler = 7
        optional FillerParameter bias_filler = 8
        optional Engine engine = 15 [default=DEFAULT]
        optional int32 axis = 16 [default=1]
        optional bool force_nd_im2col = 17 [default=false]
        optional CuDNNConvolutionAlgorithmSeeker cudnn_convolution_algo_seeker = 19 [default=FINDEX]
        repeated uint32 shape_offset = 20
    """,
    "CropParameter": """
        optional int32 axis = 1 [default=2]
        repeated uint32 offset = 2
    """,
    "DataParameter": """
        optional string source = 1
        optional uint32 batch_size = 4
        optional uint32 rand_skip = 7 [default=0]
        optional DB backend = 8 [default=LEVELDB]
        optional float scale = 2 [default=1]
        optional string mean_file = 3
        optional uint32 crop_size = 5 [default=0]
        optional bool mirror = 6 [default=false]
        optional bool force_encoded_color = 9 [default=false]
        optional uint32 prefetch = 10 [default=4]
    """,
    "DropoutParameter": """
        optional float dropout_ratio = 1 [default=0.5]
        optional bool sqrt_scale = 2 [default=false]
    """,
    "DummyDataParameter": """
        repeated FillerParameter data_filler = 1
        repeated BlobShape shape = 6
        repeated uint32 num = 2
        repeated uint32 channels = 3
        repeated uint32 height = 4
        repeated uint32 width = 5
    """,
    "EltwiseParameter": """
        optional EltwiseOp operation = 1 [default=SUM]
        repeated float coeff = 2
        optional bool stable_prod_grad = 3 [default=true]
    """,
    "ELUParameter": "optional float alpha = 1 [default=1]",
    "ExpParameter": """
        optional float base = 1 [default=-1.0]
        optional float scale = 2 [default=1.0]
        optional float shift = 3 [default=0.0]
    """,
    "FlattenParameter": """
        optional int32 axis = 1 [default=1]
        optional int32 end_axis = 2 [default=-1]
    """,
    "HDF5DataParameter": """
        optional string source = 1
        optional uint32 batch_size = 2
        optional bool shuffle = 3 [default=false]
    """,
    "HDF5OutputParameter": "optional string file_name = 1",
    "HingeLossParameter": "optional Norm norm = 1 [default=L1]",
    "ImageDataParameter": """
        optional string source = 1
        optional uint32 batch_size = 4 [default=1]
        optional uint32 rand_skip = 7 [default=0]
        optional bool shuffle = 8 [default=false]
        optional uint32 new_height = 9 [default=0]
        optional uint32 new_width = 10 [default=0]
        optional bool is_color = 11 [default=true]
        optional float scale = 2 [default=1]
        optional string mean_file = 3
        optional uint32 crop_size = 5 [default=0]
        optional bool mirror = 6 [default=false]
        optional string root_folder = 12 [default=]
        optional bool face_transform = 13 [default=false]
        optional float max_shear_ratio = 14 [default=0]
        optional float max_aspect_ratio = 15 [default=0]
        optional float max_rotate_angle = 16 [default=0]
        optional float min_random_scale = 17 [default=1]
        optional float max_random_scale = 18 [default=1]
        optional uint32 max_random_shift = 19 [default=0]
        optional bool face_mirror = 20 [default=false]
        optional uint32 face_point_num = 21 [default=0]
        optional bool balance_class = 22 [default=false]
        optional uint32 balance_by = 23 [default=0]
        optional uint32 label_cut_start = 24 [default=0]
        optional uint32 label_cut_end = 25 [default=0]
    """,
    "InfogainLossParameter": """
        optional string source = 1
        optional int32 axis = 2 [default=1]
    """,
    "InnerProductParameter": """
        optional uint32 num_output = 1
        optional bool bias_term = 2 [default=true]
        optional FillerParameter weight_filler = 3
        optional FillerParameter bias_filler = 4
        optional int32 axis = 5 [default=1]
        optional bool transpose = 6 [default=false]
        optional bool normalize = 7 [default=false]
    """,
    "InputParameter": "repeated BlobShape shape = 1",
    "LogParameter": """
        optional float base = 1 [default=-1.0]
        optional float scale = 2 [default=1.0]
        optional float shift = 3 [default=0.0]
    """,
    "LRNParameter": """
        optional uint32 local_size = 1 [default=5]
        optional float alpha = 2 [default=1.0]
        optional float beta = 3 [default=0.75]
        optional NormRegion norm_region = 4 [default=ACROSS_CHANNELS]
        optional float k = 5 [default=1.0]
        optional Engine engine = 6 [default=DEFAULT]
    """,
    "MemoryDataParameter": """
        optional uint32 batch_size = 1
        optional uint32 channels = 2
        optional uint32 height = 3
        optional uint32 width = 4
        optional bool transpose = 5 [default=false]
    """,
    "MVNParameter": """
        optional bool normalize_variance = 1 [default=true]
        optional bool across_channels = 2 [default=false]
        optional float eps = 3 [default=1e-9]
    """,
    "ParameterParameter": """
        optional BlobShape shape = 1
        optional FillerParameter blob_filler = 2
    """,
    "PoolingParameter": """
        optional PoolMethod pool = 1 [default=MAX]
        optional uint32 pad = 4 [default=0]
        optional uint32 pad_h = 9 [default=0]
        optional uint32 pad_w = 10 [default=0]
        optional uint32 kernel_size = 2
        optional uint32 kernel_h = 5
        optional uint32 kernel_w = 6
        optional uint32 stride = 3 [default=1]
        optional uint32 stride_h = 7
        optional uint32 stride_w = 8
        optional Engine engine = 11 [default=DEFAULT]
        optional bool global_pooling = 12 [default=false]
        optional RoundMode round_mode = 13 [default=CEIL]
        optional float blobs_a_min = 14 [default=0.0001]
        optional bool ceil_mode = 1013 [default=true]
    """,
    "PowerParameter": """
        optional float power = 1 [default=1.0]
        optional float scale = 2 [default=1.0]
        optional float shift = 3 [default=0.0]
    """,
    "PReLUParameter": """
        optional FillerParameter filler = 1
        optional bool channel_shared = 2 [default=false]
    """,
    "PythonParameter": """
        optional string module = 1
        optional string layer = 2
        optional string param_str = 3 [default=]
        optional bool share_in_parallel = 4 [default=false]
    """,
    "ReductionParameter": """
        optional ReductionOp operation = 1 [default=SUM]
        optional int32 axis = 2 [default=0]
        optional float coeff = 3 [default=1.0]
    """,
    "ReLUParameter": """
        optional float negative_slope = 1 [default=0]
        optional Engine engine = 2 [default=DEFAULT]
    """,
    "ReshapeParameter": """
        optional BlobShape shape = 1
        optional int32 axis = 2 [default=0]
        optional int32 num_axes = 3 [default=-1]
    """,
    "ScaleParameter": """
        optional int32 axis = 1 [default=1]
        optional int32 num_axes = 2 [default=1]
        optional FillerParameter filler = 3
        optional bool bias_term = 4 [default=false]
        optional FillerParameter bias_filler = 5
        optional float min_value = 6
        optional float max_value = 7
    """,
    "BiasParameter": """
        optional int32 axis = 1 [default=1]
        optional int32 num_axes = 2 [default=1]
        optional FillerParameter filler = 3
    """,
    "SigmoidParameter": "optional Engine engine = 1 [default=DEFAULT]",
    "SoftmaxParameter": """
        optional Engine engine = 1 [default=DEFAULT]
        optional int32 axis = 2 [default=1]
        optional float hard_ratio = 3 [default=1]
        repeated float class_weight = 4
        optional int32 hard_mining_label = 5
        optional float cutting_point = 6
        optional string normalize_type = 7 [default=Softmax]
        optional float label_smooth_factor = 8 [default=0]
    """,
    "SliceParameter": """
        optional int32 axis = 3 [default=1]
        repeated uint32 slice_point = 2
        optional uint32 slice_dim = 1 [default=1]
    """,
    "SwishParameter": "optional float beta = 1 [default=1]",
    "TanHParameter": "optional Engine engine = 1 [default=DEFAULT]",
    "ThresholdParameter": "optional float threshold = 1 [default=0]",
    "TileParameter": """
        optional int32 axis = 1 [default=1]
        optional int32 tiles = 2
    """,
    "BatchNormParameter": """
        optional bool use_global_stats = 1
        optional float moving_average_fraction = 2 [default=0.999]
        optional float eps = 3 [default=1e-5]
        optional bool disable_mean = 4 [default=false]
        optional bool disable_variance = 5 [default=false]
        optional FillerParameter scale_filler = 7
        optional FillerParameter bias_filler = 8
        optional Engine engine = 15 [default=DEFAULT]
    """,
    # happynear/caffe-windows (AM-Softmax, NormFace) and SphereFace layers: their forks' caffe.proto.
    "FlipParameter": """
        optional bool flip_width = 1 [default=true]
        optional bool flip_height = 2 [default=false]
    """,
    "NormalizeParameter": """
        optional string normalize_type = 1 [default=L2]
        optional bool fix_gradient = 2 [default=false]
        optional bool bp_norm = 3 [default=false]
    """,
    "MarginInnerProductParameter": """
        optional uint32 num_output = 1
        optional MarginType type = 2 [default=SINGLE]
        optional FillerParameter weight_filler = 3
        optional int32 axis = 4 [default=1]
        optional float base = 5 [default=1]
        optional float gamma = 6 [default=0]
        optional float power = 7 [default=1]
        optional int32 iteration = 8 [default=0]
        optional float lambda_min = 9 [default=0]
    """,
    "LabelSpecificAddParameter": """
        optional float bias = 1 [default=0.0]
        optional bool transform_test = 2 [default=false]
        optional float bias_base = 3 [default=0.0]
        optional float bias_gamma = 4 [default=0.0]
        optional float bias_power = 5 [default=1.0]
        optional float bias_min = 6 [default=0.0]
        optional float bias_max = 7 [default=0.0]
        optional uint32 iteration = 8 [default=0]
    """,
    "ChannelScaleParameter": """
        optional bool do_forward = 1 [default=true]
        optional bool do_backward_feature = 2 [default=true]
        optional bool do_backward_scale = 3 [default=true]
        optional bool global_scale = 4 [default=false]
        optional float max_global_scale = 5 [default=1000.0]
        optional float min_global_scale = 6 [default=0.0]
        optional float init_global_scale = 7 [default=1.0]
    """,
    # happynear/caffe-windows (commit 26628614, the ms-era caffe.proto with label_specific_add_param = 241).
    "InnerDistanceParameter": """
        optional uint32 num_output = 1
        optional bool bias_term = 2 [default=true]
        optional FillerParameter weight_filler = 3
        optional FillerParameter bias_filler = 4
        optional int32 axis = 5 [default=1]
        optional bool transpose = 6 [default=false]
        optional string distance_type = 7 [default=L2]
        optional bool normalize = 8 [default=false]
        optional bool update_center_only = 9 [default=false]
    """,
    "GeneralContrastiveParameter": """
        optional float positive_margin = 1 [default=0.0]
        optional float negative_margin = 2 [default=1.0]
        optional float positive_weight = 3 [default=1.0]
        optional float negative_weight = 4 [default=1.0]
        optional float normalize_negative = 5 [default=0.0]
        optional float positive_outlier_thresh = 6 [default=4.0]
        optional bool square = 7 [default=false]
        optional bool max_negative_only = 8 [default=false]
        optional bool max_positive_only = 9 [default=false]
        optional bool positive_first = 10 [default=false]
        optional float positive_upper_bound = 11 [default=1.0]
        optional bool exp_negative_weight = 12 [default=false]
        optional bool add_intra_mae = 13 [default=false]
        optional float max_negative_margin = 14 [default=1.2]
    """,
    "SoftContrastiveParameter": """
        optional float positive_margin = 1 [default=1.0]
        optional float negative_margin = 2 [default=1.0]
        optional float positive_weight = 3 [default=1.0]
        optional float negative_weight = 4 [default=1.0]
        optional float exponent_scale = 5 [default=1.0]
        optional bool square = 6 [default=false]
    """,
    "GeneralTripletParameter": """
        optional float margin = 1 [default=0.2]
        optional bool add_center_loss = 2 [default=true]
        optional bool hardest_only = 3 [default=false]
        optional bool positive_first = 4 [default=false]
        optional float positive_upper_bound = 5 [default=1.0]
        optional float positive_weight = 6 [default=1.0]
        optional float negative_weight = 7 [default=1.0]
    """,
    "CenterLossParameter": """
        optional uint32 num_output = 1
        optional FillerParameter center_filler = 2
        optional int32 axis = 3 [default=1]
        optional string distance_type = 29 [default=L2]
    """,
    "LargeMarginInnerProductParameter": """
        optional uint32 num_output = 1
        optional LargeMarginType type = 2 [default=SINGLE]
        optional FillerParameter weight_filler = 3
        optional int32 axis = 4 [default=1]
        optional float base = 5 [default=1]
        optional float gamma = 6 [default=0]
        optional float power = 7 [default=1]
        optional int32 iteration = 8 [default=0]
        optional float lambda_min = 9 [default=0]
    """,
    "LabelSpecificRescaleParameter": """
        optional float positive_weight = 1 [default=1.0]
        optional float negative_weight = 2 [default=1.0]
        optional float positive_lower_bound = 3 [default=0.0]
        optional float negative_upper_bound = 4 [default=0.0]
        optional bool rescale_test = 5 [default=false]
        optional bool for_ip = 6 [default=false]
        optional float positive_weight_base = 7 [default=0.0]
        optional float gamma = 8 [default=0.0]
        optional float power = 9 [default=1.0]
        optional float positive_weight_min = 10 [default=0.0]
        optional float positive_weight_max = 11 [default=0.0]
        optional uint32 iteration = 12 [default=0]
        optional bool bias_fix = 13 [default=false]
        optional bool power_on_positive = 14 [default=false]
    """,
    "LabelSpecificMarginParameter": """
        optional MarginType type = 9 [default=HARD]
        optional float margin_base = 1 [default=0.0]
        optional float margin_max = 2 [default=10.0]
        optional float power = 3 [default=1.0]
        optional float gamma = 4 [default=1.0]
        optional int32 iteration = 5 [default=0]
        optional bool reset_margin = 6 [default=false]
        optional bool margin_on_test = 7 [default=false]
        optional bool auto_tune = 8 [default=false]
    """,
    "LabelSpecificAffineParameter": """
        optional float scale_base = 1 [default=1.0]
        optional float scale_gamma = 2 [default=0.0]
        optional float scale_power = 3 [default=1.0]
        optional float scale_max = 4 [default=1.0]
        optional bool transform_test = 5 [default=false]
        optional uint32 iteration = 6 [default=0]
        optional float bias_base = 7 [default=0.0]
        optional float bias_gamma = 8 [default=0.0]
        optional float bias_power = 9 [default=1.0]
        optional float bias_max = 10 [default=0.0]
        optional float power_base = 11 [default=1.0]
        optional float power_gamma = 12 [default=0.0]
        optional float power_power = 13 [default=-1.0]
        optional float power_min = 14 [default=0.5]
        optional bool auto_tune = 15 [default=false]
        optional bool reset = 16 [default=false]
    """,
    "LabelSpecificHardMarginParameter": "optional float positive_weight = 1 [default=0.5]",
    # A solver file (BVLC SolverParameter; happynear's and SphereFace's are the same for these numbers).
    "SolverParameter": """
        optional string net = 24
        optional NetParameter net_param = 25
        optional string train_net = 1
        repeated string test_net = 2
        optional NetParameter train_net_param = 21
        repeated NetParameter test_net_param = 22
        optional NetState train_state = 26
        repeated NetState test_state = 27
        repeated int32 test_iter = 3
        optional int32 test_interval = 4 [default=0]
        optional bool test_compute_loss = 19 [default=false]
        optional bool test_initialization = 32 [default=true]
        optional float base_lr = 5
        optional int32 display = 6
        optional int32 average_loss = 33 [default=1]
        optional int32 max_iter = 7
        optional int32 iter_size = 36 [default=1]
        optional string lr_policy = 8
        optional float gamma = 9
        optional float power = 10
        optional float momentum = 11
        optional float weight_decay = 12
        optional string regularization_type = 29 [default=L2]
        optional int32 stepsize = 13
        repeated int32 stepvalue = 34
        optional float clip_gradients = 35 [default=-1]
        optional int32 snapshot = 14 [default=0]
        optional string snapshot_prefix = 15
        optional bool snapshot_diff = 16 [default=false]
        optional SnapshotFormat snapshot_format = 37 [default=BINARYPROTO]
        optional SolverMode solver_mode = 17 [default=GPU]
        optional int32 device_id = 18 [default=0]
        optional int64 random_seed = 20 [default=-1]
        optional string type = 40 [default=SGD]
        optional float delta = 31 [default=1e-8]
        optional float momentum2 = 39 [default=0.999]
        optional float rms_decay = 38
        optional bool debug_info = 23 [default=false]
        optional bool snapshot_after_train = 28 [default=true]
        optional SolverType solver_type = 30 [default=SGD]
    """,
    "V1LayerParameter": """
        repeated string bottom = 2
        repeated string top = 3
        optional string name = 4
        repeated NetStateRule include = 32
        repeated NetStateRule exclude = 33
        optional LayerType type = 5
        repeated BlobProto blobs = 6
        repeated string param = 1001
        repeated DimCheckMode blob_share_mode = 1002
        repeated float blobs_lr = 7
        repeated float weight_decay = 8
        repeated float loss_weight = 35
        optional AccuracyParameter accuracy_param = 27
        optional ArgMaxParameter argmax_param = 23
        optional ConcatParameter concat_param = 9
        optional ContrastiveLossParameter contrastive_loss_param = 40
        optional ConvolutionParameter convolution_param = 10
        optional DataParameter data_param = 11
        optional DropoutParameter dropout_param = 12
        optional DummyDataParameter dummy_data_param = 26
        optional EltwiseParameter eltwise_param = 24
        optional ExpParameter exp_param = 41
        optional HDF5DataParameter hdf5_data_param = 13
        optional HDF5OutputParameter hdf5_output_param = 14
        optional HingeLossParameter hinge_loss_param = 29
        optional ImageDataParameter image_data_param = 15
        optional InfogainLossParameter infogain_loss_param = 16
        optional InnerProductParameter inner_product_param = 17
        optional LRNParameter lrn_param = 18
        optional MemoryDataParameter memory_data_param = 22
        optional MVNParameter mvn_param = 34
        optional PoolingParameter pooling_param = 19
        optional PowerParameter power_param = 21
        optional ReLUParameter relu_param = 30
        optional SigmoidParameter sigmoid_param = 38
        optional SoftmaxParameter softmax_param = 39
        optional SliceParameter slice_param = 31
        optional TanHParameter tanh_param = 37
        optional ThresholdParameter threshold_param = 25
        optional TransformationParameter transform_param = 36
        optional LossParameter loss_param = 42
        optional PReLUParameter prelu_param = 45
    """,
    # Views used to read a binary caffemodel: only what identifies a layer and its weights. Every other
    # field (hyper-parameters, possibly fork-specific numbers) is skipped as unknown, so field-number
    # collisions between forks cannot break the read. ``layer`` (V0) is kept only to detect V0 files.
    "LayerBlobs": """
        optional string name = 1
        optional string type = 2
        repeated BlobProto blobs = 7
    """,
    "V1LayerBlobs": """
        optional bytes layer = 1
        optional string name = 4
        optional int32 type = 5
        repeated BlobProto blobs = 6
    """,
}

_F = descriptor_pb2.FieldDescriptorProto
_SCALARS = {
    "double": _F.TYPE_DOUBLE, "float": _F.TYPE_FLOAT, "int64": _F.TYPE_INT64, "uint64": _F.TYPE_UINT64,
    "int32": _F.TYPE_INT32, "uint32": _F.TYPE_UINT32, "bool": _F.TYPE_BOOL, "string": _F.TYPE_STRING,
    "bytes": _F.TYPE_BYTES,
}
_FIELD = re.compile(
    r"^(optional|repeated) (\w+) (\w+) = (\d+)(?: \[default=([^\]]*)\])?( \[packed\])?$"
)


def _build_file() -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto(name="keras_margin_caffe.proto", package=PACKAGE, syntax="proto2")
    messages = {}
    for name in _MESSAGES:
        messages[name] = proto.message_type.add(name=name)
    for qualified, values in _ENUMS.items():
        owner, _, enum_name = qualified.rpartition(".")
        enum = (messages[owner].enum_type if owner else proto.enum_type).add(name=enum_name)
        for item in values.split():
            value_name, number = item.split("=")
            enum.value.add(name=value_name, number=int(number))
    for name, body in _MESSAGES.items():
        for line in filter(None, (text.strip() for text in body.strip().splitlines())):
            match = _FIELD.match(line)
            if match is None:
                raise AssertionError(f"schema: cannot read field line {line!r} of {name}")
            label, type_name, field_name, number, default, packed = match.groups()
            field = messages[name].field.add(
                name=field_name,
                number=int(number),
                label=_F.LABEL_REPEATED if label == "repeated" else _F.LABEL_OPTIONAL,
            )
            if type_name in _SCALARS:
                field.type = _SCALARS[type_name]
            elif f"{name}.{type_name}" in _ENUMS:
                field.type, field.type_name = _F.TYPE_ENUM, f".{PACKAGE}.{name}.{type_name}"
            elif type_name in _ENUMS:
                field.type, field.type_name = _F.TYPE_ENUM, f".{PACKAGE}.{type_name}"
            elif type_name in _MESSAGES:
                field.type, field.type_name = _F.TYPE_MESSAGE, f".{PACKAGE}.{type_name}"
            else:
                raise AssertionError(f"schema: unknown type {type_name!r} in {name}.{field_name}")
            if default is not None:
                field.default_value = default
            if packed:
                field.options.packed = True
    return proto


_POOL = descriptor_pool.DescriptorPool()
_POOL.Add(_build_file())


def message_class(name: str) -> type:
    """The generated message class for ``name`` (e.g. ``"ConvolutionParameter"``) of this schema."""
    return message_factory.GetMessageClass(_POOL.FindMessageTypeByName(f"{PACKAGE}.{name}"))


NetParameter = message_class("NetParameter")
LayerParameter = message_class("LayerParameter")
V1LayerParameter = message_class("V1LayerParameter")
BlobProto = message_class("BlobProto")
BlobShape = message_class("BlobShape")
NetState = message_class("NetState")
NetStateRule = message_class("NetStateRule")
ParamSpec = message_class("ParamSpec")
FillerParameter = message_class("FillerParameter")
LayerBlobs = message_class("LayerBlobs")
V1LayerBlobs = message_class("V1LayerBlobs")
SolverParameter = message_class("SolverParameter")

#: V1 ``LayerType`` enum number -> V2 type string (BVLC ``UpgradeV1LayerType``; happynear's 41-48 mapped
#: to the V2 types they correspond to, which BVLC's upgrader lacks).
V1_LAYER_TYPES: dict[int, str] = {
    1: "Accuracy", 2: "BNLL", 3: "Concat", 4: "Convolution", 5: "Data", 6: "Dropout", 7: "EuclideanLoss",
    8: "Flatten", 9: "HDF5Data", 10: "HDF5Output", 11: "Im2col", 12: "ImageData", 13: "InfogainLoss",
    14: "InnerProduct", 15: "LRN", 16: "MultinomialLogisticLoss", 17: "Pooling", 18: "ReLU", 19: "Sigmoid",
    20: "Softmax", 21: "SoftmaxWithLoss", 22: "Split", 23: "TanH", 24: "WindowData", 25: "Eltwise",
    26: "Power", 27: "SigmoidCrossEntropyLoss", 28: "HingeLoss", 29: "MemoryData", 30: "ArgMax",
    31: "Threshold", 32: "DummyData", 33: "Slice", 34: "MVN", 35: "AbsVal", 36: "Silence",
    37: "ContrastiveLoss", 38: "Exp", 39: "Deconvolution", 43: "Normalize", 45: "TripletLoss",
    47: "BatchNorm",
}


# ----------------------------------------------------------------------------------------------------
# Dialects: where the forks' caffe.proto files disagree
# ----------------------------------------------------------------------------------------------------

#: The Caffe forks this schema reconciles: BVLC (upstream), happynear/caffe-windows (AM-Softmax, NormFace),
#: SphereFace's fork (wy1iu/sphereface tools/caffe-sphereface).
DIALECTS: tuple[str, ...] = ("bvlc", "happynear", "sphereface")

DIALECT_SOURCES: dict[str, str] = {
    "bvlc": "BVLC/caffe src/caffe/proto/caffe.proto",
    "happynear": "happynear/caffe-windows (branch ms) src/caffe/proto/caffe.proto",
    "sphereface": "wy1iu/sphereface tools/caffe-sphereface/src/caffe/proto/caffe.proto",
}

#: Defaults a dialect's caffe.proto gives differently from this schema's (BVLC's): dialect ->
#: {(message, field): default}. Only ``moving_average_fraction`` differs among the fields we declare.
DIALECT_DEFAULTS: dict[str, dict[tuple[str, str], Any]] = {
    "bvlc": {},
    "happynear": {("BatchNormParameter", "moving_average_fraction"): 0.99},
    "sphereface": {},
}

_HAPPYNEAR = frozenset({"happynear"})
_HAPPYNEAR_LAYER_PARAMS = (
    "center_loss_param", "flip_param", "inner_distance_param", "normalize_param", "general_contrastive_loss_param",
    "soft_contrastive_loss_param", "general_triplet_loss_param", "largemargin_inner_product_param",
    "label_specific_rescale_param", "label_specific_margin_param", "channel_scale_param",
    "label_specific_affine_param", "label_specific_hard_margin_param", "label_specific_add_param",
)
_HAPPYNEAR_FIELDS = {
    "InnerProductParameter": ("normalize",),
    "ScaleParameter": ("min_value", "max_value"),
    "BatchNormParameter": ("disable_mean", "disable_variance", "scale_filler", "bias_filler", "engine"),
    "SoftmaxParameter": ("hard_ratio", "class_weight", "hard_mining_label", "cutting_point", "normalize_type",
                         "label_smooth_factor"),
    "AccuracyParameter": ("min_is_better",),
    "ConvolutionParameter": ("cudnn_convolution_algo_seeker", "shape_offset"),
    "ParameterParameter": ("blob_filler",),
    "DropoutParameter": ("sqrt_scale",),
    "FillerParameter": ("alpha",),
    "PoolingParameter": ("blobs_a_min",),
    "TransformationParameter": ("center_crop", "erase_ratio", "scale_min", "scale_max", "aspect_min", "aspect_max",
                                "crop_h", "crop_w"),
    "ImageDataParameter": ("face_transform", "max_shear_ratio", "max_aspect_ratio", "max_rotate_angle",
                           "min_random_scale", "max_random_scale", "max_random_shift", "face_mirror",
                           "face_point_num", "balance_class", "balance_by", "label_cut_start", "label_cut_end"),
    "MemoryDataParameter": ("transpose",),
}

#: Fields only some dialects declare: (message, field) -> those dialects. A field absent here is in all three.
FIELD_DIALECTS: dict[tuple[str, str], frozenset[str]] = {
    **{("LayerParameter", name): _HAPPYNEAR for name in _HAPPYNEAR_LAYER_PARAMS},
    **{(message, name): _HAPPYNEAR for message, names in _HAPPYNEAR_FIELDS.items() for name in names},
    ("LayerParameter", "margin_inner_product_param"): frozenset({"happynear", "sphereface"}),
    ("LayerParameter", "swish_param"): frozenset({"bvlc"}),
    ("LayerParameter", "clip_param"): frozenset({"bvlc"}),
    ("PoolingParameter", "round_mode"): frozenset({"bvlc"}),
}

#: Enum values only happynear declares: (message, field, number) -> dialects.
ENUM_VALUE_DIALECTS: dict[tuple[str, str, int], frozenset[str]] = {
    ("EltwiseParameter", "operation", 3): _HAPPYNEAR,  # SORT
    **{("PoolingParameter", "pool", number): _HAPPYNEAR for number in range(3, 9)},  # DEF .. LOWRES
}

#: Layer types only some forks implement (each has its own *_param above, or is used so in the forks'
#: published prototxts: GlobalLSEMargin in happynear/AMSoftmax prototxt/auto, no param message).
LAYER_TYPE_DIALECTS: dict[str, frozenset[str]] = {
    **{name: _HAPPYNEAR for name in (
        "Flip", "Normalize", "InnerDistance", "GeneralContrastiveLoss", "SoftContrastiveLoss", "GeneralTripletLoss",
        "LabelSpecificAdd", "LabelSpecificAffine", "LabelSpecificMargin", "LabelSpecificHardMargin",
        "LabelSpecificRescale", "ChannelScale", "GlobalLSEMargin", "LargeMarginInnerProduct",
    )},
    "MarginInnerProduct": frozenset({"happynear", "sphereface"}),
    "Swish": frozenset({"bvlc"}),
    "Clip": frozenset({"bvlc"}),
}

#: Binary field numbers that mean something else in a dialect's file: dialect -> {(message, number there):
#: number in this schema, or None where the field has no counterpart here and is dropped}.
WIRE_RENUMBERING: dict[str, dict[tuple[str, int], int | None]] = {
    "bvlc": {},
    "happynear": {("PoolingParameter", 13): None},  # happynear's blobs_lr (float, DEF pooling's learning rate)
    "sphereface": {("LayerParameter", 147): 232},  # margin_inner_product_param
}


def check_dialect(dialect: str) -> str:
    """``dialect`` normalised (lower case), or a ``ConversionError`` naming the valid ones."""
    name = str(dialect).strip().lower()
    if name not in DIALECTS:
        raise ConversionError(
            f"unknown Caffe dialect {dialect!r}; use one of {', '.join(repr(d) for d in DIALECTS)} "
            "(or None to detect it from the net)"
        )
    return name


def _dialect_of(net_or_dialect: Any) -> str:
    dialect = getattr(net_or_dialect, "dialect", net_or_dialect)
    return check_dialect("bvlc" if dialect is None else dialect)


def field_default(net_or_dialect: Any, message_name: str, field_name: str) -> Any:
    """The default of ``message_name.field_name`` in a dialect's caffe.proto (a dialect name, or anything with a
    ``dialect`` attribute such as a ``CaffeNet``; None means BVLC).

    Example:
    >>> field_default("happynear", "BatchNormParameter", "moving_average_fraction")
    0.99
    >>> round(field_default("bvlc", "BatchNormParameter", "moving_average_fraction"), 6)
    0.999
    """
    dialect = _dialect_of(net_or_dialect)
    descriptor = _POOL.FindMessageTypeByName(f"{PACKAGE}.{message_name}")
    if field_name not in descriptor.fields_by_name:
        raise ConversionError(f"schema: {message_name} has no field {field_name!r}")
    overrides = DIALECT_DEFAULTS[dialect]
    if (message_name, field_name) in overrides:
        return overrides[message_name, field_name]
    return descriptor.fields_by_name[field_name].default_value


def param_value(net_or_dialect: Any, param: Any, field_name: str) -> Any:
    """``param.field_name`` if the file sets it, else that field's default in the net's dialect.

    Example:
    >>> param_value("happynear", message_class("BatchNormParameter")(), "moving_average_fraction")
    0.99
    """
    if param.HasField(field_name):
        return getattr(param, field_name)
    return field_default(net_or_dialect, param.DESCRIPTOR.name, field_name)
