"""``python -m diffpo`` and ``accelerate launch -m diffpo ...``."""

import sys

from diffpo.cli import main

sys.exit(main())
