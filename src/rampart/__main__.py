"""`python -m rampart`: the command line."""

import sys

from rampart.cli import main

sys.exit(main())
