"""Start-up cost: `import mlflow_best` and `mlflow-best --help`, against importing torch (and mlflow).

    python benchmarks/bench_startup.py [--rounds 9] [--baseline /path/to/older/checkout]

Each command runs in a fresh process, round after round in interleaved order, so a busy machine
slows every command alike; the table gives the median and the fastest wall time and the median peak
RSS of each command, then the ratios to the targets (issue 12):

* ``mlflow-best --help`` <= 0.1 x ``python -c "import torch, mlflow"``
* ``python -c "import mlflow_best"`` <= 1.2 x ``python -c "import torch"``

The package is imported from this checkout (``PYTHONPATH``); ``--baseline`` adds the same
``mlflow_best`` rows for another checkout, to compare before and after in one run. Nothing is
asserted.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Children run from here, not from a checkout: `python -c` puts the current folder first on sys.path.
NEUTRAL = Path(tempfile.gettempdir())

TARGETS: tuple[tuple[str, str, float | None], ...] = (
    # (numerator, denominator, limit)
    ("mlflow-best --help", 'python -c "import torch, mlflow"', 0.1),
    ('python -c "import mlflow_best"', 'python -c "import torch"', 1.2),
    # (info) with the tracker loaded: torch and mlflow_best's own modules, not MLflow
    ('python -c "import mlflow_best; mlflow_best.Run"', 'python -c "import torch"', None),
)


def _cli_command(*args: str) -> list[str]:
    """The installed ``mlflow-best`` script of this interpreter, or ``python -m mlflow_best`` without it."""
    script = shutil.which("mlflow-best", path=str(Path(sys.executable).parent))
    return [script, *args] if script else [sys.executable, "-m", "mlflow_best", *args]


def _cases(tree: Path, label: str) -> dict[str, tuple[list[str], dict[str, str]]]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return {
        f'python -c "import mlflow_best"{label}': ([sys.executable, "-c", "import mlflow_best"], env),
        # what a training script (and every DDP rank) pays before track() talks to MLflow
        f'python -c "import mlflow_best; mlflow_best.Run"{label}': (
            [sys.executable, "-c", "import mlflow_best; mlflow_best.Run"], env
        ),
        f"mlflow-best --help{label}": (_cli_command("--help"), env),
        # a usage error (exit 2): found by click before any command body runs
        f"mlflow-best promote (missing NAME){label}": (_cli_command("promote"), env),
    }


def _measure(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of one run of ``cmd``."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=NEUTRAL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    took = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode not in (0, 2):
        raise SystemExit(f"{' '.join(cmd)} exited with {proc.returncode}")
    return took, usage.ru_maxrss / 1024  # KiB on Linux


def _check_tree(tree: Path, env: dict[str, str]) -> None:
    found = subprocess.run(
        [sys.executable, "-c", "import mlflow_best; print(mlflow_best.__file__)"],
        env=env, cwd=NEUTRAL, capture_output=True, text=True, check=True,
    ).stdout.strip()
    if not Path(found).resolve().is_relative_to(tree.resolve()):
        raise SystemExit(f"PYTHONPATH={tree} imports mlflow_best from {found}, not from that checkout")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=9, help="runs of each command (default 9)")
    p.add_argument("--baseline", type=Path, default=None, help="another checkout of mlflow_best to compare")
    args = p.parse_args()

    plain = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    cases: dict[str, tuple[list[str], dict[str, str]]] = {
        'python -c "import torch"': ([sys.executable, "-c", "import torch"], plain),
        'python -c "import torch, mlflow"': ([sys.executable, "-c", "import torch, mlflow"], plain),
        **_cases(ROOT, ""),
    }
    _check_tree(ROOT, cases['python -c "import mlflow_best"'][1])
    if args.baseline is not None:
        baseline = _cases(args.baseline, " (baseline)")
        _check_tree(args.baseline, next(iter(baseline.values()))[1])
        cases.update(baseline)

    for cmd, env in cases.values():  # warm the page cache: the first run of anything reads it from disk
        _measure(cmd, env)
    times: dict[str, list[float]] = {name: [] for name in cases}
    rss: dict[str, list[float]] = {name: [] for name in cases}
    rng = random.Random(0)
    for _ in range(args.rounds):
        order = list(cases)
        rng.shuffle(order)
        for name in order:
            took, peak = _measure(*cases[name])
            times[name].append(took)
            rss[name].append(peak)

    load = os.getloadavg()
    print(f"start-up, {args.rounds} interleaved rounds; python {platform.python_version()}, "
          f"{os.cpu_count()} CPUs, load average {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}")
    print()
    print("| command | median s | fastest s | peak RSS MB |")
    print("|---|---|---|---|")
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name in cases:
        print(f"| `{name}` | {medians[name]:.3f} | {min(times[name]):.3f} | "
              f"{statistics.median(rss[name]):.0f} |")
    print()
    print("| ratio | value | target | result |")
    print("|---|---|---|---|")
    for label in ("", " (baseline)") if args.baseline is not None else ("",):
        for num, den, limit in TARGETS:
            if num + label not in medians:
                continue
            value = medians[num + label] / medians[den]
            if limit is None:
                print(f"| `{num}{label}` / `{den}` | {value:.3f} | (info) | |")
                continue
            verdict = "PASS" if value <= limit else "FAIL"
            print(f"| `{num}{label}` / `{den}` | {value:.3f} | <= {limit} | {verdict} |")


if __name__ == "__main__":
    main()
