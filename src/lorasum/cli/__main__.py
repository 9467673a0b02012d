"""`python -m lorasum.cli ...` runs the `lorasum` command."""

import sys

from .main import main

sys.exit(main())
