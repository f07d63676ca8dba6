"""The subcommand modules import neither TensorFlow nor Keras until they run, so ``keras-margin --version``
does not pay for them."""

import subprocess
import sys


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
