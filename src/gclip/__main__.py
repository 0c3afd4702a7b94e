"""``python -m gclip`` is the ``gclip`` command."""

import sys

from .cli import main

sys.exit(main())
