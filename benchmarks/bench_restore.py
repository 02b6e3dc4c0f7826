"""Restore cost of hashing what is loaded: this tree against another checkout, in one interleaved run.

    python benchmarks/bench_restore.py --baseline /path/to/older/checkout [--rounds 7] [--mb 100]

One checkpoint (an MLP of about ``--mb`` MB of float32 weights) is tracked once into a sqlite
store; then, round after round, a fresh process of each tree restores it warm (cache filled by a
first call) and a bare ``torch.load`` + ``load_state_dict`` of the same files is timed beside them.
Prints the medians and the ratios; nothing is asserted.
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

ROOT = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent(
    """
    import json, sys, time
    import torch
    import mlflow_best
    sys.path.insert(0, sys.argv[3])
    import bench_restore_model  # noqa: F401  (the user's module, imported by the user)
    run_id, mode = sys.argv[1], sys.argv[2]
    times = []
    if mode == "bare":
        r = mlflow_best.restore(run_id)
        folder = r.path
        model = bench_restore_model.Net(**r.manifest["model"]["args"])
        for _ in range(7):
            t = time.perf_counter()
            model.load_state_dict(torch.load(folder / "model.pt", weights_only=True))
            opt = torch.optim.Adam(model.parameters())
            opt.load_state_dict(torch.load(folder / "training_state.pt", weights_only=True)["optimizer"])
            times.append(time.perf_counter() - t)
    else:
        mlflow_best.restore(run_id)  # fills the cache
        for _ in range(7):
            t = time.perf_counter()
            mlflow_best.restore(run_id)
            times.append(time.perf_counter() - t)
    print(json.dumps(min(times)))
    """
)

MODEL = textwrap.dedent(
    """
    import torch
    class Net(torch.nn.Module):
        def __init__(self, width: int = 1024, depth: int = 4):
            super().__init__()
            self.layers = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(depth)])
        def forward(self, x):
            return self.layers(x)
    """
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", type=Path, required=True, help="another checkout of mlflow_best")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--mb", type=int, default=100)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-restore-"))
    (work / "bench_restore_model.py").write_text(MODEL)
    (work / "child.py").write_text(CHILD)
    width = 1024
    depth = max(1, args.mb * (1 << 20) // (4 * width * width) // 3)  # weights + Adam's two moments
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{work / 'mlflow.db'}")
    env["MLFLOW_BEST_HOME"] = str(work / "home")
    setup = textwrap.dedent(
        f"""
        import sys, torch
        sys.path.insert(0, {str(work)!r})
        import mlflow_best, bench_restore_model
        m = bench_restore_model.Net(width={width}, depth={depth})
        opt = torch.optim.Adam(m.parameters())
        m(torch.randn(2, {width})).sum().backward(); opt.step()
        args = {{"width": {width}, "depth": {depth}}}
        with mlflow_best.track(m, opt, model_args=args, verbose=False) as run:
            run.log_epoch(0, {{"val_loss": 1.0}})
        print(run.run_id)
        """
    )
    run_id = subprocess.run(
        [sys.executable, "-c", setup], env=dict(env, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
        check=True, cwd=work,
    ).stdout.split()[-1]
    results: dict[str, list[float]] = {"this tree": [], "baseline": [], "bare torch.load": []}
    trees = {"this tree": ROOT, "baseline": args.baseline, "bare torch.load": ROOT}
    for _ in range(args.rounds):
        for name, tree in trees.items():
            mode = "bare" if name.startswith("bare") else "restore"
            # Each tree its own cache: the two formats of cache entry must not evict each other.
            home = str(work / f"home-{name.split()[0]}")
            out = subprocess.run(
                [sys.executable, str(work / "child.py"), run_id, mode, str(work)],
                env=dict(env, PYTHONPATH=str(tree), MLFLOW_BEST_HOME=home),
                capture_output=True, text=True, check=True, cwd=work,
            )
            results[name].append(json.loads(out.stdout.split()[-1]))
    med = {k: statistics.median(v) * 1e3 for k, v in results.items()}
    print(f"| warm restore, {args.mb} MB (model + Adam state), medians of {args.rounds} rounds | ms |")
    print("| --- | --- |")
    for k, v in med.items():
        print(f"| {k} | {v:.1f} |")
    print(f"| this tree / baseline | {med['this tree'] / med['baseline']:.2f} |")
    print(f"| this tree / bare torch.load | {med['this tree'] / med['bare torch.load']:.2f} |")


if __name__ == "__main__":
    main()
