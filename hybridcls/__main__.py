"""``python -m hybridcls`` (and ``torchrun -m hybridcls``) = the ``hybridcls`` command."""

import sys

from hybridcls.cli import main

sys.exit(main())
