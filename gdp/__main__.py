import sys

from gdp.cli import main

sys.exit(main())
