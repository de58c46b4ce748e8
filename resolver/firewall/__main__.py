"""`python -m resolver.firewall`: the same as `kmskeys-resolver firewall`."""

import sys

from resolver.firewall.cli import main

sys.exit(main())
