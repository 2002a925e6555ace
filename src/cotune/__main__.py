import sys

from cotune.cli.main import main

sys.exit(main())
