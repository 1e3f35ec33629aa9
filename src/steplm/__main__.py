import sys

from steplm.cli import main

sys.exit(main())
