"""`python -m lorasum ...` runs the `lorasum` command (as does `python -m lorasum.cli`)."""

import sys

from .cli.main import main

sys.exit(main())
