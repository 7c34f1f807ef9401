import sys

from imageopt.cli import main

sys.exit(main())
