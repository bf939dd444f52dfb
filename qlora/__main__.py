import sys

from qlora.cli import main

sys.exit(main())
