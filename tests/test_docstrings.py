"""Every docstring example of every module of keras_margin, keras_margin_cli and converters runs and prints what
it says; every public class and function of keras_margin.layers and keras_margin.losses has an example.

The modules are discovered with ``pkgutil.walk_packages``, so a new module is covered without editing this file;
a module without examples passes. The doctests of the converters, the export package and the command-line
modules run TensorFlow (TFLite, tf2onnx, the Caffe importer's TF ops) and are not backend-agnostic; the others
run again on JAX in CI.
"""

from __future__ import annotations

import doctest
import importlib
import inspect
import pkgutil

import pytest

import converters
import keras_margin
import keras_margin.layers
import keras_margin.losses
import keras_margin_cli

PACKAGES = (keras_margin, keras_margin_cli, converters)
#: Module-name prefixes whose examples need the TensorFlow backend.
TENSORFLOW_ONLY = ("converters", "keras_margin.export", "keras_margin_cli")
OPTIONS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def all_modules():
    """Every module of the three packages, packages included; ``__main__`` modules (which run) are left out."""
    names = []
    for package in PACKAGES:
        names.append(package.__name__)
        names.extend(info.name for info in pkgutil.walk_packages(package.__path__, package.__name__ + ".")
                     if info.name.rsplit(".", 1)[-1] != "__main__")
    return sorted(set(names))


def _param(name):
    agnostic = not any(name == prefix or name.startswith(prefix + ".") for prefix in TENSORFLOW_ONLY)
    return pytest.param(name, id=name, marks=[pytest.mark.backend_agnostic] if agnostic else [])


MODULES = all_modules()


def test_walk_finds_the_modules_the_old_lists_missed():
    for name in ("keras_margin.core", "keras_margin.distribution", "keras_margin.evaluation.lfw",
                 "keras_margin.layers", "converters.caffe.reader", "keras_margin_cli.verify"):
        assert name in MODULES


@pytest.mark.parametrize("name", [_param(name) for name in MODULES])
def test_docstring_examples_run(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an example that writes a file writes it here
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=OPTIONS, verbose=False, report=True)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples of {name} failed (printed above)"


def _has_example(obj) -> bool:
    return any(example for test in doctest.DocTestFinder(recurse=False).find(obj, obj.__name__)
               for example in test.examples)


@pytest.mark.backend_agnostic
@pytest.mark.parametrize("module", [keras_margin.layers, keras_margin.losses], ids=lambda m: m.__name__)
def test_every_public_class_and_function_has_an_example(module):
    public = [getattr(module, name) for name in module.__all__]
    missing = [obj.__name__ for obj in public
               if (inspect.isclass(obj) or inspect.isfunction(obj)) and not _has_example(obj)]
    assert not missing, f"{module.__name__}: no docstring example in {missing}"
