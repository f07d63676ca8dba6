"""Every docstring example in ``keras_margin.evaluation`` runs and prints what it says."""

import doctest

import pytest

import keras_margin_cli.verify
import keras_margin.evaluation.embeddings
import keras_margin.evaluation.images
import keras_margin.evaluation.metrics
import keras_margin.evaluation.pairs
import keras_margin.evaluation.plot

MODULES = [keras_margin_cli.verify, keras_margin.evaluation.embeddings, keras_margin.evaluation.images,
           keras_margin.evaluation.metrics, keras_margin.evaluation.pairs, keras_margin.evaluation.plot]


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_docstring_examples_run(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0
    assert result.failed == 0
