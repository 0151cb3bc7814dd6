"""User-facing defaults that the command line and the library share, in a module light enough
for ``deltafix --help`` to import (no torch, no transformers)."""

from __future__ import annotations

UTILITY_SAMPLES = 128
"""Conversations of the user's data used for calibration, as GPTQ and SparseGPT use 128 sequences:
the user's file is often the whole fine-tuning set, and a sequential RegMean solve costs time in
proportion to the tokens it reads (1800 conversations to 128 on the toy testbed, 445 to 128 on the
real one)."""
