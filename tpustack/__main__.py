"""`python -m tpustack` is the `tpustack` console script."""

import sys

from tpustack.cli import main

sys.exit(main())
