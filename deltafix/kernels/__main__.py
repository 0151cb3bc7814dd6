"""``python -m deltafix.kernels``: build the CUDA extension ahead of time (see ``build``)."""

import sys

from deltafix.kernels.build import main

sys.exit(main())
