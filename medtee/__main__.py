import sys

from medtee.cli import main

sys.exit(main())
