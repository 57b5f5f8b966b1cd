import sys

from reflexd.tools.cli import main

sys.exit(main())
