"""``python -m longreach.launchers …`` is the ``longreach`` command."""
import sys

from longreach.launchers.cli import main

sys.exit(main())
