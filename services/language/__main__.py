"""python -m services.language --model DIR [--encode HOST:PORT,...] [...]: the language service
(flags: services.language.cli; wiring and lifecycle: services.language.server)."""

import sys

from services.language.server import main

if __name__ == "__main__":
    sys.exit(main())
