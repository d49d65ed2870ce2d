"""``python -m uagw``: the same command line as ``python -m ua_gateway`` and ``ua-gateway``.

May import: ``uagw.cli``.
"""

import sys

from uagw.cli import main

if __name__ == "__main__":
    sys.exit(main())
