"""CGI example: the page is secret_page.py, beside this file (see its docstring and README.md).

Kept to these lines on purpose: Python compiles the script it runs on every request and keeps
bytecode only for the modules it imports, so the page's code lives in one.
"""

import sys

from secret_page import main

sys.exit(main())
