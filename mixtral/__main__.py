"""`python -m mixtral` runs the command line (also under torchrun: `torchrun -m mixtral ...`)."""

import sys

from mixtral.cli import main

sys.exit(main())
