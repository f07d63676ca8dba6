"""Every docstring example in the public modules runs and prints what it says."""

import doctest

import pytest

import keras_margin.layers
import keras_margin.losses
import keras_margin.margins.normface

pytestmark = pytest.mark.backend_agnostic


@pytest.mark.parametrize("module", [keras_margin.layers, keras_margin.losses, keras_margin.margins.normface],
                         ids=lambda m: m.__name__)
def test_docstring_examples_run(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0
    assert result.failed == 0
