"""``python -m deltafix.kernels``: build the kernels ahead of time: the CPU kernel (see ``cpu``),
then the CUDA extension (see ``build``). The exit status is the CUDA extension's, as before."""

import sys

from deltafix.kernels import cpu
from deltafix.kernels.build import main

print(cpu.report_line())
sys.exit(main())
