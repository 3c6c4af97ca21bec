import sys

from scdd_cli import main

sys.exit(main())
