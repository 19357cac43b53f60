"""``python -m featurescope``: the same as the ``featurescope`` command."""

import sys

from featurescope.cli import main

sys.exit(main())
