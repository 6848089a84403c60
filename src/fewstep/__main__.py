import sys

from fewstep.cli import main

sys.exit(main())
