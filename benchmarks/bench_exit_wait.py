"""How long the end of a `with track(...)` block waits when epochs come faster than MLflow takes them.

5,000 quick epochs (3 metrics each, improving only at epoch 0) on a fresh sqlite store; the figure is
the time spent in ``__exit__`` (the queue draining), measured for this checkout and, with
``--baseline DIR``, for another checkout of mlflow_best, in one run, alternating.

    python benchmarks/bench_exit_wait.py --baseline /path/to/old/checkout [--epochs 5000] [--rounds 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

CHILD = textwrap.dedent(
    """
    import json, sys, time
    import mlflow, torch
    import mlflow_best
    epochs = int(sys.argv[1])
    mlflow.set_tracking_uri(sys.argv[2])
    run = mlflow_best.track(torch.nn.Linear(4, 2), None, experiment="exit-wait", verbose=False,
                            model_args={"in_features": 4, "out_features": 2})
    t0 = time.perf_counter()
    run.__enter__()
    t1 = time.perf_counter()
    for epoch in range(epochs):
        run.log_epoch(epoch, {"val_loss": 1.0 if epoch == 0 else 2.0, "train_loss": 0.5, "lr": 0.1})
    t2 = time.perf_counter()
    run.__exit__(None, None, None)
    t3 = time.perf_counter()
    rows = len(mlflow.MlflowClient().get_metric_history(run.run_id, "train_loss"))
    print(json.dumps({"loop": t2 - t1, "exit": t3 - t2, "rows": rows}))
    """
)


def measure(tree: Path, epochs: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, PYTHONPATH=str(tree), MLFLOW_BEST_HOME=str(Path(tmp) / "home"))
        uri = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(epochs), uri], env=env, cwd=tmp, capture_output=True, text=True,
            check=True,
        )
        result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
        return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline", type=Path, help="another checkout to compare with")
    parser.add_argument("--epochs", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    here = Path(__file__).resolve().parents[1]
    trees = {"this checkout": here} | ({"baseline": args.baseline.resolve()} if args.baseline else {})
    results: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    for _ in range(args.rounds):
        for name, tree in trees.items():
            results[name].append(measure(tree, args.epochs))
    print(f"{args.epochs} epochs, sqlite, median of {args.rounds} round(s)\n")
    print("| tree | loop (s) | wait at exit (s) | metric rows |")
    print("| --- | --- | --- | --- |")
    for name, rows in results.items():
        loop = statistics.median(r["loop"] for r in rows)
        wait = statistics.median(r["exit"] for r in rows)
        print(f"| {name} | {loop:.2f} | {wait:.2f} | {int(rows[0]['rows'])} |")
    if args.baseline:
        ratio = statistics.median(r["exit"] for r in results["this checkout"]) / statistics.median(
            r["exit"] for r in results["baseline"]
        )
        print(f"\nwait at exit, this checkout / baseline: {ratio:.3f}x")


if __name__ == "__main__":
    main()
