"""``python -m deepscale.launcher ...`` is the ``deepscale`` command."""
import sys

from deepscale.launcher.runner import main

sys.exit(main())
