"""`scenec` from this checkout without installing it (a device machine: the checkout and carried wheels)."""

import sys

from common import use_checkout

if __name__ == "__main__":
    use_checkout()
    from scenec.cli import main

    sys.argv[0] = "scenec"
    sys.exit(main())
