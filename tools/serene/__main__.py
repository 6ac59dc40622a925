"""`python -m serene` = the `serene` console script."""

import sys

from serene.cli import main

sys.exit(main())
