"""``python -m keras_margin_cli``: the same as the ``keras-margin`` command."""

import sys

from keras_margin_cli import main

sys.exit(main())
