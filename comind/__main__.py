import sys

from comind.cli import main

sys.exit(main())
