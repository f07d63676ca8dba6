"""The package's public surface: what ``import keras_margin`` makes reachable, as README writes it."""

import importlib

import pytest

import keras_margin

pytestmark = pytest.mark.backend_agnostic


@pytest.mark.parametrize("path", ["export.export_onnx", "export.export_tflite", "evaluation.evaluate_lfw",
                                  "evaluation.Preprocessing", "distribution.shard_heads", "losses.AMSoftmaxLoss",
                                  "layers.AMSoftmaxHead", "InputContract", "find_input_contract"])
def test_readme_names_are_reachable_after_import_keras_margin(path):
    value = keras_margin
    for part in path.split("."):
        value = getattr(value, part)
    assert value is not None


def test_every_name_in_all_exists():
    for name in keras_margin.__all__:
        assert hasattr(keras_margin, name), name


def test_dir_lists_the_lazy_subpackages():
    assert {"export", "evaluation", "distribution", "layers", "losses"} <= set(dir(keras_margin))


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        keras_margin.nope  # noqa: B018


def test_lazy_attribute_is_the_submodule():
    assert keras_margin.export is importlib.import_module("keras_margin.export")
