"""`python -m promptcache ...`: the same as the `promptcache` console script."""

import sys

from .cli import main

sys.exit(main())
