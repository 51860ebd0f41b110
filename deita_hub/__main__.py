import sys

from deita_hub.cli import main

sys.exit(main())
