"""What ships: the kernel sources (top-level ``cuda_ext/``), the built-in data and the recipes are in
the wheel and the sdist, and an installed wheel finds and builds its own kernel sources.

The slow tests build from a clean copy of the committed tree (``git archive HEAD``), not from the
working tree, so a file that is only on this disk cannot make them pass. Everything is offline:
pip builds without isolation (no setuptools download) and installs with ``--no-index``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

import deltafix
from deltafix.kernels import build, cpu, sources
from deltafix.methods import method_names

ROOT = Path(__file__).resolve().parent.parent
KERNEL_SUFFIXES = (".cu", ".cuh", ".cpp", ".c")
KERNEL_FILES = sorted((*build.SOURCES, *build.HEADERS, cpu.SOURCE))


def kernel_files_in(folder: Path) -> list[str]:
    """The kernel source files in ``folder`` (a checkout's ``cuda_ext/``), by suffix, so a source added
    there without a package-data pattern for its suffix fails the wheel test."""
    return sorted(p.name for p in folder.iterdir() if p.suffix in KERNEL_SUFFIXES)


def run(*args: str | Path, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command, failing the test with its output when it fails."""
    done = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(map(str, args))} failed:\n{done.stdout}\n{done.stderr}"
    return done


@dataclass(frozen=True)
class Dists:
    """A clean copy of the committed tree and the wheel and sdist built from it."""

    tree: Path
    wheel: Path
    sdist: Path


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> Dists:
    if shutil.which("git") is None or shutil.which("tar") is None or not (ROOT / ".git").exists():
        pytest.skip("needs git, tar and a git checkout")
    base = tmp_path_factory.mktemp("packaging")
    tree, out = base / "tree", base / "dist"
    tree.mkdir()
    run("git", "archive", "--format=tar", "-o", base / "head.tar", "HEAD", cwd=ROOT)
    run("tar", "-xf", base / "head.tar", cwd=tree)
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
        "-w", out, ".", cwd=tree)
    # the PEP 517 hook that `python -m build --sdist --no-isolation` calls; `build` need not be installed
    run(sys.executable, "-c", f"from setuptools import build_meta; build_meta.build_sdist({str(out)!r})", cwd=tree)
    (wheel,), (sdist,) = out.glob("*.whl"), out.glob("*.tar.gz")
    return Dists(tree, wheel, sdist)


def shipped_files(tree: Path) -> list[str]:
    """Paths (relative to the project root) that must be in both the wheel and the sdist."""
    data = sorted(p.relative_to(tree).as_posix() for p in (tree / "deltafix" / "data").glob("*.jsonl"))
    assert data, "no built-in data files in the tree"
    return [*(f"cuda_ext/{name}" for name in kernel_files_in(tree / "cuda_ext")), "cuda_ext/__init__.py", *data,
            *(f"deltafix/recipes/{method}.yaml" for method in method_names()),
            *sorted(p.relative_to(tree).as_posix() for p in (tree / "deltafix" / "recipes" / "train").glob("*.yaml"))]


def test_the_checkout_finds_its_kernel_sources_in_cuda_ext() -> None:
    """From a source checkout (an editable install, as in CI), the sources are the checkout's cuda_ext/,
    and every file the builds name is there and nothing else of their kind."""
    if Path(deltafix.__file__).resolve().parent.parent != ROOT:
        pytest.skip("deltafix is not imported from this checkout")
    assert sources.source_dir().resolve() == ROOT / "cuda_ext"
    assert kernel_files_in(ROOT / "cuda_ext") == KERNEL_FILES


def test_a_missing_kernel_source_is_a_reason_not_an_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A broken install (no sources) leaves deltafix importable; the lookup says where it looked."""
    monkeypatch.setattr(sources, "source_dir", lambda: tmp_path)
    with pytest.raises(FileNotFoundError, match=f"resta_cpu.c is missing from {tmp_path}"):
        sources.source_file(cpu.SOURCE)


@pytest.mark.slow
def test_wheel_and_sdist_carry_kernel_sources_data_and_recipes(dists: Dists) -> None:
    expected = shipped_files(dists.tree)
    assert set(KERNEL_FILES) <= {Path(p).name for p in expected}
    with zipfile.ZipFile(dists.wheel) as whl:
        in_wheel = set(whl.namelist())
    assert [p for p in expected if p not in in_wheel] == []
    with tarfile.open(dists.sdist) as sdist:
        top = sdist.getnames()[0].split("/")[0]
        in_sdist = {name.partition("/")[2] for name in sdist.getnames() if name.startswith(f"{top}/")}
    assert [p for p in expected if p not in in_sdist] == []


@pytest.fixture(scope="module")
def installed(dists: Dists, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel installed into a folder of its own (``pip install --target``); its dependencies come
    from this environment through ``wheel_env``."""
    target = tmp_path_factory.mktemp("site")
    run(sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", target, dists.wheel,
        cwd=target)
    return target


def wheel_env(target: Path, **extra: str) -> dict[str, str]:
    """This environment with the installed wheel first on the path (``DELTAFIX_KERNELS`` unset)."""
    env = {**os.environ, "PYTHONPATH": str(target), **extra}
    env.pop("DELTAFIX_KERNELS", None)
    return env


@pytest.mark.slow
def test_an_installed_wheel_finds_and_builds_its_own_kernel_sources(installed: Path, tmp_path: Path) -> None:
    """Installed from the wheel, deltafix finds the kernel sources in the install, and the CPU kernel
    builds from them into a fresh cache."""
    cache = tmp_path / "cache"
    env = wheel_env(installed, DELTAFIX_CACHE=str(cache))
    # the current folder is tmp_path, not the checkout: it comes first on sys.path under `python -m`
    where = run(sys.executable, "-c", "import deltafix, cuda_ext; print(deltafix.__file__); print(cuda_ext.__file__)",
                cwd=tmp_path, env=env).stdout.split()
    assert [Path(p).parent.parent for p in where] == [installed, installed]

    # builds the CPU kernel first, so the doctor below loads it; the exit status is the CUDA extension's
    built = subprocess.run([sys.executable, "-m", "deltafix.kernels"], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=600)
    report = json.loads(run(sys.executable, "-m", "deltafix", "doctor", "--json", cwd=tmp_path, env=env).stdout)
    assert report["kernels"]["sources"] == {"dir": str(installed / "cuda_ext"), "missing": [], "reason": None}
    c = report["kernels"]["cpu_kernel"]
    if cpu.compiler() is None:
        assert not c["loaded"] and "no C compiler" in c["reason"]
        return
    library = Path(c["library"])
    assert c["loaded"] and library.is_file() and library.is_relative_to(cache / "cpu_ext"), c
    assert f"deltafix CPU kernel ready in {library}" in built.stdout, built.stdout + built.stderr


def demo_rows(cwd: Path, env: dict[str, str], out: Path) -> list[dict]:
    """``deltafix demo --json``'s rows without their timings, which differ from run to run."""
    rows = json.loads(run(sys.executable, "-m", "deltafix", "demo", "--json", "--out", out, cwd=cwd, env=env).stdout)
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows["rows"]]


@pytest.mark.heavy  # two demo runs, about a minute: run with pytest -m heavy
def test_the_demo_from_the_wheel_prints_the_source_trees_table(installed: Path, tmp_path: Path) -> None:
    """Issue 19: the demo from an installed wheel gives the same table as from the source tree. Both
    runs share this environment's deltafix cache, so the testbed is built at most once (about 25 s
    a run once it is cached)."""
    from_tree = demo_rows(ROOT, {**os.environ}, tmp_path / "tree")
    (tmp_path / "work").mkdir()
    from_wheel = demo_rows(tmp_path / "work", wheel_env(installed), tmp_path / "wheel")
    assert {f"F + {method}" for method in method_names()} <= {row["model"] for row in from_tree}
    assert from_wheel == from_tree
