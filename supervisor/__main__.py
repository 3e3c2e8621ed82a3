"""``python -m supervisor`` is ``blast-supervisor``."""

import sys

from .cli import main

sys.exit(main())
