"""``python -m adakv_local`` runs the command line."""

import sys

from .cli import main

sys.exit(main())
