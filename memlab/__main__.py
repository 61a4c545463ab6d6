"""``python -m memlab`` is the ``memlab`` command (also under ``torchrun -m memlab``)."""

import sys

from memlab.cli import main

sys.exit(main())
