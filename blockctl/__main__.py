"""``python -m blockctl``."""

import sys

from blockctl._cli.main import main

sys.exit(main())
