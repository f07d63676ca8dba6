"""The ``keras-margin`` command: version, help and argument errors answer without importing any framework;
real commands keep the framework's start-up log off the terminal; plug-ins come from entry points."""

import pathlib
import subprocess
import sys

import pytest

import keras_margin
import keras_margin_cli
from keras_margin_cli import plugins

FRAMEWORKS = ("tensorflow", "keras", "jax", "torch", "onnx", "onnxruntime", "cv2", "keras_margin")


def _run_in_fresh_python(argv):
    """Run keras_margin_cli.main(argv) in a new interpreter; return (exit code, stdout, stderr, frameworks)."""
    code = (
        "import sys, keras_margin_cli\n"
        f"try:\n    code = keras_margin_cli.main({argv!r})\n"
        "except SystemExit as exit_:\n    code = exit_.code\n"
        f"loaded = sorted(m for m in {FRAMEWORKS!r} if m in sys.modules)\n"
        "print('LOADED', loaded, file=sys.stderr)\n"
        "sys.exit(code)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    *rest, loaded_line = result.stderr.rstrip("\n").split("\n")
    assert loaded_line.startswith("LOADED"), result.stderr
    return result.returncode, result.stdout, "\n".join(rest), loaded_line[len("LOADED "):]


@pytest.mark.parametrize("argv", [["--version"], ["--help"], [], ["convert", "--help"], ["export", "--help"],
                                  ["verify", "--help"], ["convert"], ["export", "m.keras", "--quantize", "int4"],
                                  ["no-such-command"]],
                         ids=lambda argv: " ".join(argv) or "no arguments")
def test_version_help_and_usage_errors_import_no_framework(argv):
    code, out, err, loaded = _run_in_fresh_python(argv)
    assert loaded == "[]", f"{argv} imported {loaded}"
    assert code in (0, 2)
    if argv == ["--version"]:
        assert out.strip() == f"keras-margin {keras_margin.__version__}"
    if code == 2:
        assert "usage:" in err and "error:" in err
        assert "Traceback" not in err


def test_installed_version_is_the_package_version():
    assert keras_margin_cli.version() == keras_margin.__version__


def test_help_lists_every_subcommand_from_its_entry_point():
    code, out, _, _ = _run_in_fresh_python(["--help"])
    assert code == 0
    for name in ("convert", "export", "train", "verify"):
        assert name in out
    assert [point.name for point in plugins.entry_points(plugins.COMMANDS)] == ["convert", "export", "train", "verify"]


def test_a_real_command_prints_only_its_own_lines(tmp_path):
    # A command that starts the framework and then fails on bad input: one line, none of TensorFlow's log.
    result = subprocess.run([sys.executable, "-m", "keras_margin_cli", "export", str(tmp_path / "absent.keras"),
                             "--onnx", str(tmp_path / "m.onnx")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        f"keras-margin export: error: {tmp_path / 'absent.keras'}: no such model file"]


def test_console_script_is_installed():
    result = subprocess.run(["keras-margin", "--version"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"keras-margin {keras_margin.__version__}"


def test_keras_margin_package_never_names_converters():
    root = pathlib.Path(keras_margin.__file__).parent
    offenders = [str(path.relative_to(root)) for path in root.rglob("*.py") if "converters" in path.read_text()]
    assert offenders == []


def test_import_keras_margin_registers_the_caffe_layers():
    # A fresh interpreter: only `import keras_margin`, then Keras can resolve the converter's layer names.
    code = ("import keras, keras_margin\n"
            "print(keras.saving.get_registered_object('keras_margin_caffe>Flip').__module__)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "converters.caffe.layers"


def _shadowing_converters(tmp_path):
    """A foreign top-level 'converters' package (other PyPI distributions ship one), and the lines that make a
    fresh interpreter find it first on sys.path, before this checkout's packages (the editable install's
    import hook, which would map 'converters' straight to this checkout, is taken out)."""
    foreign = tmp_path / "site" / "converters"
    foreign.mkdir(parents=True)
    (foreign / "__init__.py").write_text('"""Someone else\'s converters package."""\n')
    checkout = pathlib.Path(keras_margin.__file__).resolve().parent.parent
    preload = ("import sys\n"
               "sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in getattr(f, '__module__', '')]\n"
               f"sys.path[:0] = [{str(foreign.parent)!r}, {str(checkout)!r}]\n")
    return foreign, preload


def test_a_shadowing_converters_package_is_named_plainly(tmp_path):
    foreign, preload = _shadowing_converters(tmp_path)
    code = preload + "import keras_margin_cli\nraise SystemExit(keras_margin_cli.main(['convert', 'net.prototxt']))\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert str(foreign / "__init__.py") in result.stderr
    assert "shadows keras-margin's" in result.stderr


def test_a_shadowing_converters_package_is_a_warning_on_import(tmp_path):
    foreign, preload = _shadowing_converters(tmp_path)
    code = (preload + "import warnings\nwarnings.simplefilter('always')\n"
            "with warnings.catch_warnings(record=True) as caught:\n"
            "    import keras_margin\n"
            "print([str(w.message) for w in caught if 'plug-in' in str(w.message)])\n"
            "print(keras_margin.AMSoftmaxHead(3).num_classes)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    warning, classes = result.stdout.strip().splitlines()
    assert "plug-in 'caffe'" in warning and str(foreign / "__init__.py") in warning
    assert classes == "3"
