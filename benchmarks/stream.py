"""Streaming overhead and memory of ``deltafix repair`` (not a test; prints numbers).

For each model size it generates Llama-shaped random bf16 checkpoints P, A, F (sharded), then
times, in the same run, (1) a plain copy that reads every tensor of A and F and writes F's tensors
with the same writer, and (2) ``deltafix repair --method resta`` three ways:

- "cold" hashes every input file for the report (sha256, once per file) in a deltafix cache empty
  but for the CPU kernel, built beforehand as ``deltafix doctor`` does;
- "warm" finds the hashes in the memo, as any later run on the same files does, and as any run on
  Hub downloads does (their blob names are the hashes);
- "torch" is the warm run with ``DELTAFIX_KERNELS=torch``: RESTA's stream through torch instead of
  the CPU kernel (the fallback where no C compiler is found).

Each job runs in a fresh subprocess, timed after torch is imported, so its peak RSS is its own. The
four jobs run ``--repeats`` times, interleaved, and the median run of each is shown. Targets
(DESIGN §7): repair/copy time ratio ≤ 1.5, and peak RSS growing by < 10 % when the model size
doubles.

    python benchmarks/stream.py [--sizes-gb 2 4] [--repeats 3] [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from deltafix.io.writer import ShardedWriter, ShardPlan, TensorSpec

HIDDEN, INTERMEDIATE, VOCAB = 2048, 5504, 32000
INPUT_SHARD_BYTES = 1_000_000_000
OUT_SHARD_BYTES = "1GB"
JOBS = ("copy", "cold", "warm", "torch")


def llama_shapes(n_layers: int) -> list[tuple[str, tuple[int, ...]]]:
    shapes = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(n_layers):
        p = f"model.layers.{i}."
        shapes += [(p + "input_layernorm.weight", (HIDDEN,)), (p + "post_attention_layernorm.weight", (HIDDEN,))]
        shapes += [(p + f"self_attn.{n}_proj.weight", (HIDDEN, HIDDEN)) for n in "qkvo"]
        shapes += [(p + "mlp.gate_proj.weight", (INTERMEDIATE, HIDDEN)), (p + "mlp.up_proj.weight", (INTERMEDIATE, HIDDEN)),
                   (p + "mlp.down_proj.weight", (HIDDEN, INTERMEDIATE))]
    return shapes + [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]


def layers_for(size_gb: float) -> int:
    per_layer = (4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTERMEDIATE + 2 * HIDDEN) * 2
    fixed = 2 * VOCAB * HIDDEN * 2
    return max(1, round((size_gb * 1e9 - fixed) / per_layer))


def make_checkpoint(folder: Path, n_layers: int, seed: int) -> None:
    """Random bf16 checkpoint written with deltafix's own writer (sharded, with index)."""
    folder.mkdir(parents=True)
    specs = [TensorSpec(n, s, torch.bfloat16) for n, s in llama_shapes(n_layers)]
    gen = torch.Generator().manual_seed(seed)
    with ShardedWriter(folder, ShardPlan.build(specs, INPUT_SHARD_BYTES), {}) as writer:
        for spec in specs:
            writer.add(spec.name, (0.02 * torch.randn(spec.shape, generator=gen)).to(torch.bfloat16))
        writer.finish()
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))


def plain_copy(a: str, f: str, out: str) -> None:
    """The baseline: read every tensor of A and F, write F's tensors."""
    from deltafix.io.reader import CheckpointReader

    ra, rf = CheckpointReader(a), CheckpointReader(f)
    specs = [TensorSpec(n, rf.info(n).shape, rf.info(n).dtype) for n in rf.names]
    Path(out).mkdir()
    with ShardedWriter(Path(out), ShardPlan.build(specs, 10**9), {}) as writer:
        for spec in specs:
            ra.get(spec.name)
            writer.add(spec.name, rf.get(spec.name))
        writer.finish()


def child_main(args: list[str]) -> None:
    """Run one measured job in this (fresh) process and print its seconds and peak RSS as JSON."""
    start = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_SELF)
    cpu_start = before.ru_utime + before.ru_stime
    if args[0] == "copy":
        plain_copy(*args[1:])
    else:
        from deltafix.cli import main

        rc = main(["repair", "--method", "resta", "--base", args[1], "--finetuned", args[2], "--unaligned",
                   args[3], "--out", args[4], "--out-shard-size", OUT_SHARD_BYTES, "--device", "cpu", "--json"])
        if rc:
            raise SystemExit(rc)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"seconds": time.perf_counter() - start, "cpu": usage.ru_utime + usage.ru_stime - cpu_start,
                      "peak_rss": usage.ru_maxrss * 1024}), file=sys.stderr)


def measure(args: list[str], cache: Path, kernels: str = "auto") -> dict[str, float]:
    env = {**os.environ, "DELTAFIX_CACHE": str(cache), "DELTAFIX_KERNELS": kernels}
    proc = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stderr.strip().splitlines()[-1])


def build_kernels(cache: Path) -> None:
    """Build the CPU kernel into ``cache`` before a timed run, as ``deltafix doctor`` does ahead of use."""
    env = {**os.environ, "DELTAFIX_CACHE": str(cache)}
    code = "from deltafix.kernels import cpu; import sys; sys.exit(cpu.load().reason)"
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def median_run(jobs: list[dict[str, float]]) -> dict[str, float]:
    """The run with the median wall time: one slow run on a shared VM does not decide the ratio."""
    return sorted(jobs, key=lambda job: job["seconds"])[len(jobs) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-gb", type=float, nargs="+", default=[2.0, 4.0])
    parser.add_argument("--repeats", type=int, default=3, help="runs of each job per size; the median is shown")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    opts = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="deltafix-bench-", dir=opts.workdir))
    rows = []
    try:
        for size in opts.sizes_gb:
            n = layers_for(size)
            root = work / f"{size:g}GB"
            for role, seed in (("P", 0), ("A", 1), ("F", 2)):
                make_checkpoint(root / role, n, seed)
            inputs = [str(root / "A"), str(root / "F"), str(root / "P")]
            runs: dict[str, list[dict[str, float]]] = {kind: [] for kind in JOBS}
            for rep in range(opts.repeats):  # interleaved, so a slow spell of the machine hits every job
                runs["copy"].append(measure(["copy", *inputs[:2], str(root / "out")], work / "cache"))
                shutil.rmtree(root / "out")
                for kind, cache in (("cold", f"cache-{size:g}-{rep}"), ("warm", f"cache-{size:g}-0"),
                                    ("torch", f"cache-{size:g}-0")):
                    # cold: a fresh cache (but for the kernel); warm: the cache the first cold run filled
                    if kind == "cold":
                        build_kernels(work / cache)
                    runs[kind].append(measure(["repair", *inputs, str(root / "out")], work / cache,
                                              "torch" if kind == "torch" else "auto"))
                    shutil.rmtree(root / "out")
            rows.append((size, n, *(median_run(runs[kind]) for kind in JOBS)))
            shutil.rmtree(root)
    finally:
        if not opts.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"median of {opts.repeats} runs each; ratio: repair time / copy time")
    print(f"{'size':>6} {'layers':>6} {'copy s':>7}" + "".join(f" {kind + ' s':>7} {'ratio':>6}" for kind in JOBS[1:])
          + f" {'copy RSS':>9} {'resta RSS':>9}")
    for size, n, copy, *repairs in rows:
        print(f"{size:>5g}G {n:>6} {copy['seconds']:>7.1f}"
              + "".join(f" {r['seconds']:>7.1f} {r['seconds'] / copy['seconds']:>6.2f}" for r in repairs)
              + f" {copy['peak_rss'] / 1e9:>8.2f}G {repairs[1]['peak_rss'] / 1e9:>8.2f}G")
    print("CPU seconds (user + system, all threads; unaffected by time stolen by a hypervisor):")
    for size, _, copy, *repairs in rows:
        print(f"{size:>5g}G copy {copy['cpu']:.1f}" + "".join(
            f"  {kind} {r['cpu']:.1f} ({r['cpu'] / copy['cpu']:.2f}x)" for kind, r in zip(JOBS[1:], repairs)))
    if len(rows) >= 2:
        growth = rows[-1][4]["peak_rss"] / rows[0][4]["peak_rss"] - 1
        print(f"resta peak RSS growth from {rows[0][0]:g} GB to {rows[-1][0]:g} GB: {100 * growth:+.1f} %")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_main(sys.argv[2:])
    else:
        main()
