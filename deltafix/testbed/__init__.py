"""Tiny local models and data for the demo, the tests and the benchmarks (no downloads).

``build_testbed()`` returns a ``Testbed`` of paths: checkpoints P (unaligned), A (aligned),
F (fine-tuned with harmful data), F_benign, F_lora (adapter) and the JSONL data files. See
``build`` for the model chain, ``language`` for the data and ``training`` for the models.
"""

from deltafix.testbed.build import Recipe, Testbed, build_testbed, default_cache_dir, write_pipeline_data

__all__ = ["Recipe", "Testbed", "build_testbed", "default_cache_dir", "write_pipeline_data"]
