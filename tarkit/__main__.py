import sys

from tarkit.cli import main

sys.exit(main())
