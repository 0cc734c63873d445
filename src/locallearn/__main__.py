"""``python -m locallearn`` (also what ``torchrun -m locallearn`` runs)."""

import sys

from locallearn.cli import main

sys.exit(main())
