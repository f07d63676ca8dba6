"""Shared test set-up: quiet TensorFlow logs, a fixed seed per test, the float32 policy restored after each, and
``shared_dir``: the shared folder of published files (``$KERAS_MARGIN_SHARED``, default ``shared/`` beside the
repository), or a skip that says how to provide it."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_and_policy():
    keras.utils.set_random_seed(1234)
    yield
    keras.mixed_precision.set_global_policy("float32")


@pytest.fixture
def shared_dir():
    """The shared folder (tests/caffe_nets.py's ``shared_dir()``); skips when it is absent."""
    from tests.caffe_nets import shared_dir as locate
    from tests.caffe_nets import shared_missing

    path = locate()
    if not path.is_dir():
        pytest.skip(shared_missing(path, "the shared folder"))
    return path
