"""Every docstring example in converters.caffe runs and prints what it says."""

import doctest

import pytest

import converters.caffe.builder
import converters.caffe.cli
import converters.caffe.errors
import converters.caffe.layers
import converters.caffe.parity
import converters.caffe.planner
import converters.caffe.reader
import converters.caffe.registry
import converters.caffe.schema
import converters.caffe.upgrade
import converters.caffe.writer

MODULES = [converters.caffe.builder, converters.caffe.cli, converters.caffe.errors, converters.caffe.layers,
           converters.caffe.parity, converters.caffe.planner, converters.caffe.reader, converters.caffe.registry,
           converters.caffe.schema, converters.caffe.upgrade, converters.caffe.writer]


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_docstring_examples_run(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0
    assert result.failed == 0
