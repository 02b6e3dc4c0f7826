"""DistributedDataParallel: every rank runs the same code, rank 0 alone talks to MLflow.

Two processes (gloo on CPU, ``init_method=file://``) run the script below as torchrun would: each
calls ``track`` and ``log_epoch`` exactly as single-process code does, with *different* local
metrics, so that a rank deciding on its own numbers would be caught.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from tests.helpers import launch_ranks, unique

pytestmark = pytest.mark.slow

WORLD = 2
# Rank 0 improves at epochs 0, 1, 3; rank 1's own numbers would improve at 0, 2, 4, 5.
VALUES = [[1.0, 0.8, 0.9, 0.5, 0.6, 0.7], [0.9, 1.0, 0.8, 0.9, 0.7, 0.6]]
RANK0_IMPROVES = [True, True, False, True, False, False]

WORKER = textwrap.dedent(
    """
    import json, os, sys
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    import mlflow_best

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    init, out, experiment, name = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
    values = json.loads(sys.argv[5])[rank]
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    result = {}

    def step(model, opt):
        x = torch.randn(8, 4)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()  # DDP all-reduces the gradients: the weights stay identical on all ranks
        opt.step()

    def session(resume, epochs):
        torch.manual_seed(1)
        model = DDP(torch.nn.Linear(4, 2))
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        with mlflow_best.track(model, opt, experiment=experiment, registered_model=name, resume=resume,
                               model_args={"in_features": 4, "out_features": 2}, verbose=False) as run:
            start = run.start_epoch
            weights_at_start = model.module.weight.detach().clone()
            decisions = []
            for epoch in range(start, epochs):
                step(model, opt)
                decisions.append(run.log_epoch(epoch, {"val_loss": values[epoch], "rank": float(rank)}))
        # Every rank must leave the block: a rank stuck inside it would hang this barrier.
        dist.barrier()
        return run, start, decisions, model, weights_at_start

    run, _, decisions, model, _ = session(None, 4)
    result.update(run_id=run.run_id, decisions=decisions, best=[run.best.epoch, run.best.value])
    result["final_weight"] = model.module.weight.detach().tolist()

    # Restore on every rank, onto that rank's device (cuda:<rank> on GPUs; the CPU here).
    device = f"cuda:{rank}" if torch.cuda.is_available() else "cpu"
    r = mlflow_best.restore(run.run_id, model=torch.nn.Linear(4, 2), device=device)
    result["restored"] = {
        "epoch": r.epoch,
        "devices": sorted({str(t.device) for t in r.model.state_dict().values()}),
        "optimizer_devices": sorted({str(v.device) for s in r.optimizer.state.values() for k, v in s.items()
                                     if isinstance(v, torch.Tensor) and k != "step"}),
    }

    # Resume the same run under DDP: every rank starts at the same epoch with rank 0's weights.
    run2, start, decisions2, model2, weights_at_start = session(run.run_id, 6)
    gathered = [None] * world
    dist.all_gather_object(gathered, weights_at_start.tolist())
    result.update(resume_start=start, resume_decisions=decisions2, resume_run_id=run2.run_id,
                  resumed_weights=gathered)

    # A run that cannot start (an unknown run id) fails on every rank instead of hanging rank 1.
    try:
        session("0" * 32, 6)
        result["bad_resume"] = "no error"
    except mlflow_best.MlflowBestError as e:
        result["bad_resume"] = f"{type(e).__name__}: {e}"
    # The DDP modules hold the process group: released here, so that its gloo threads are joined by
    # destroy_process_group and not torn down during interpreter finalization, where torch can abort
    # the process ("terminate called without an active exception", seen once in 8 full runs).
    del model, model2, run, run2
    import gc
    gc.collect()
    dist.destroy_process_group()
    import threading
    # What would keep the process alive, or still run at exit: none of our threads, no other thread.
    result["threads_left"] = sorted(t.name for t in threading.enumerate() if t is not threading.main_thread()
                                    and (not t.daemon or t.name.startswith("mlflow_best")))
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(result, f)
    sys.stdout.flush()
    os._exit(0)  # the results are written (threads_left included); mlflow_best has no atexit handlers
    """
)


def _launch(tmp_path: Path, experiment: str, name: str) -> list[dict[str, Any]]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER, encoding="utf-8")
    argv = [str(tmp_path / "init"), str(tmp_path), experiment, name, json.dumps(VALUES)]
    launch_ranks(script, argv, tmp_path, WORLD)
    return [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(WORLD)]


def test_ddp_rank0_logs_and_decides_every_rank_agrees_restores_and_resumes(
    sqlite_uri: str, tmp_path: Path
) -> None:
    experiment, name = unique("ddp"), unique("ddp")
    ranks = _launch(tmp_path, experiment, name)
    r0, r1 = ranks
    assert r0["threads_left"] == r1["threads_left"] == []

    # One run, created by rank 0; both ranks know its id.
    client = MlflowClient(sqlite_uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == [r0["run_id"]] == [r1["run_id"]]
    assert r0["resume_run_id"] == r1["resume_run_id"] == r0["run_id"]

    # Rank 0's decision, on both ranks, although rank 1's own numbers say otherwise.
    assert r0["decisions"] == r1["decisions"] == RANK0_IMPROVES[:4]
    assert r0["best"] == r1["best"] == [3, 0.5]

    # Only rank 0 logged: its values and its rank number, once per epoch.
    history = {m.step: m.value for m in client.get_metric_history(r0["run_id"], "val_loss")}
    assert history == {e: VALUES[0][e] for e in range(6)}
    assert {m.value for m in client.get_metric_history(r0["run_id"], "rank")} == {0.0}

    # One version per improvement of rank 0, registered once.
    versions = sorted(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))
    assert [int(v.tags["epoch"]) for v in versions] == [e for e, up in enumerate(RANK0_IMPROVES[:4]) if up]

    # Restore on every rank maps to that rank's device.
    for rank, result in enumerate(ranks):
        assert result["restored"]["epoch"] == 3
        assert result["restored"]["devices"] == ["cpu"], f"rank {rank}"
        assert result["restored"]["optimizer_devices"] == ["cpu"], f"rank {rank}"

    # Resume under DDP: both ranks start after the newest checkpoint, with the same weights.
    assert r0["resume_start"] == r1["resume_start"] == 4
    # The checkpoint of epoch 3 holds the weights after epoch 3: every rank resumed with exactly those.
    assert r0["final_weight"] == r1["final_weight"]
    assert r0["resumed_weights"] == [r0["final_weight"]] * WORLD
    assert r0["resume_decisions"] == r1["resume_decisions"] == RANK0_IMPROVES[4:]

    # A run that cannot start raises on every rank; no rank is left waiting for rank 0.
    assert r0["bad_resume"].startswith("ConfigError") and "is not a run" in r0["bad_resume"]
    assert r1["bad_resume"].startswith("TrackingStoreError") or r1["bad_resume"].startswith("ConfigError")
    assert "rank 0" in r1["bad_resume"]


CACHE_WORKER = textwrap.dedent(
    """
    import json, os, sys
    import torch
    import torch.distributed as dist
    import mlflow_best

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    init, out, run_id, attempts = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    expected = torch.load(f"{out}/weight.pt", weights_only=True)
    results = []
    for attempt in range(attempts):
        cache = f"{out}/cache-{attempt}"  # empty: every rank finds no entry and downloads
        dist.barrier()  # all ranks restore at the same instant, as after torch.distributed setup
        try:
            r = mlflow_best.restore(run_id, model=torch.nn.Linear(512, 2048), cache_dir=cache)
            results.append({"path": str(r.path), "equal": bool(torch.equal(r.model.weight, expected))})
        except Exception as e:
            results.append({"error": repr(e)[:500]})
    dist.barrier()
    dist.destroy_process_group()
    with open(f"{out}/cache-rank{rank}.json", "w") as f:
        json.dump(results, f)
    """
)


def test_ranks_of_one_node_restoring_at_once_share_the_download_cache(
    sqlite_uri: str, tmp_path: Path
) -> None:
    import torch

    import mlflow_best

    model = torch.nn.Linear(512, 2048)  # 4 MB: a download long enough for the ranks to overlap
    args = {"in_features": 512, "out_features": 2048}
    with mlflow_best.track(model, None, experiment=unique("cache"), model_args=args, verbose=False) as run:
        run.log_epoch(0, {"val_loss": 1.0})
    torch.save(model.weight.detach().clone(), tmp_path / "weight.pt")
    script = tmp_path / "cache_worker.py"
    script.write_text(CACHE_WORKER, encoding="utf-8")
    world, attempts = 3, 3
    argv = [str(tmp_path / "init"), str(tmp_path), run.run_id, str(attempts)]
    env = {"MLFLOW_TRACKING_URI": sqlite_uri}
    launch_ranks(script, argv, tmp_path, world, log_prefix="cache-rank", env=env)
    ranks = [json.loads((tmp_path / f"cache-rank{rank}.json").read_text()) for rank in range(world)]
    for attempt in range(attempts):
        got = [ranks[rank][attempt] for rank in range(world)]
        assert all(g.get("equal") is True for g in got), got  # every rank loaded the exact weights
        assert len({g["path"] for g in got}) == 1, got  # from one shared cache entry
        # The cache holds that one complete entry; no rank left a partial download (a folder) or a
        # second copy. Dot-files are the cache's own bookkeeping (its key).
        entries = list((tmp_path / f"cache-{attempt}").iterdir())
        assert [p.name for p in entries if not p.name.startswith(".")] == [Path(got[0]["path"]).name]
        assert not [p.name for p in entries if p.name.startswith(".") and p.is_dir()], entries
