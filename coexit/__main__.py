"""`python -m coexit ...` runs the `coexit` command, for launchers that take a module rather than a script:
`torchrun --nproc_per_node N -m coexit serve --tp N ...`."""

import sys

from coexit.cli import main

sys.exit(main())
