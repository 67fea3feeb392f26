import sys

from lnjax.app.cli import main

sys.exit(main())
