"""Every docstring example in ``keras_margin.export`` runs; the subcommand modules import neither TensorFlow
nor Keras until they run, so ``keras-margin --version`` does not pay for them.
"""

import doctest
import subprocess
import sys

import pytest

import keras_margin_cli.export
import keras_margin.export.embedding
import keras_margin.export.loading
import keras_margin.export.onnx_export
import keras_margin.export.parity
import keras_margin.export.tflite_export

MODULES = [keras_margin_cli.export, keras_margin.export.embedding, keras_margin.export.loading,
           keras_margin.export.onnx_export, keras_margin.export.parity, keras_margin.export.tflite_export]


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_docstring_examples_run(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0
    assert result.failed == 0


def test_subcommand_modules_do_not_import_tensorflow_or_keras():
    # keras_margin/__init__.py imports the heads (so Keras); a bare keras_margin package stands in for it, so
    # only what the subcommand packages import themselves is measured.
    code = (
        "import importlib.util, sys, types\n"
        "spec = importlib.util.find_spec('keras_margin')\n"
        "bare = types.ModuleType('keras_margin'); bare.__path__ = list(spec.submodule_search_locations)\n"
        "sys.modules['keras_margin'] = bare\n"
        "import keras_margin_cli.export, keras_margin_cli.verify, keras_margin.export, keras_margin.evaluation\n"
        "print(sorted(m for m in ('tensorflow', 'keras', 'onnx', 'onnxruntime', 'matplotlib') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
