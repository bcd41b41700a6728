import sys

from loralab.cli import main

sys.exit(main())
