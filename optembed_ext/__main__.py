"""``python -m optembed_ext ...`` runs the ``optembed`` command line."""
import sys

from .cli import main

sys.exit(main())
