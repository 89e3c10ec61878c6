import sys

from medlib.cli import main

sys.exit(main())
