"""`python -m stabletrain` = the `stabletrain` command."""

import sys

from stabletrain.cli import main

sys.exit(main())
