"""`python -m OrthoKneeLib.cli`: the orthoknee command."""

import sys

from . import main

sys.exit(main())
