import sys

from scdd.cli import main

sys.exit(main())
