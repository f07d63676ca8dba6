"""The console entry point."""

import subprocess
import sys

from keras_margin import __version__
from keras_margin.cli import main


def test_version_flag(capsys):
    try:
        main(["--version"])
    except SystemExit as exit_:
        assert exit_.code == 0
    assert capsys.readouterr().out.strip() == f"keras-margin {__version__}"


def test_console_script_is_installed():
    result = subprocess.run([sys.executable, "-m", "keras_margin.cli", "--version"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert __version__ in result.stdout
