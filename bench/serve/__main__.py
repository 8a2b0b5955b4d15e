"""Load generator for OpenAI-compatible servers (splitvl, vLLM, SGLang).

(usage and sample output filled in below)
"""

import sys

from bench.serve.cli import main

if __name__ == "__main__":
    sys.exit(main())
