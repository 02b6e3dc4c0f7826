"""A hyper-parameter sweep: four processes train at once against one server and one registered model."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from mlflow_best._criterion import Criterion
from mlflow_best._registry import ensure_registered_model, move_alias_to_best
from tests._server import LineReader, MlflowServer, die_with_parent
from tests.helpers import unique

pytestmark = [pytest.mark.slow, pytest.mark.server]

PROCESSES, EPOCHS, REPETITIONS = 4, 5, 5

# The four processes are started once (importing torch and mlflow costs seconds each on 2 cores)
# and run one sweep per repetition: each waits for that repetition's "go" file, so all four create
# the experiment and the registered model, register versions and move the alias at the same time.
CHILD = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    import torch
    import mlflow_best

    uri, plan = sys.argv[1], json.loads(sys.argv[2])
    print("RESULT ready", flush=True)
    for rep in plan:
        while not Path(rep["go"]).exists():
            time.sleep(0.005)
        torch.manual_seed(len(rep["values"]))
        model = torch.nn.Linear(8, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with mlflow_best.track(model, opt, tracking_uri=uri, experiment=rep["experiment"],
                               registered_model=rep["name"], verbose=False) as run:
            decisions = [run.log_epoch(epoch, {"val_loss": v}) for epoch, v in enumerate(rep["values"])]
        result = {"run_id": run.run_id, "decisions": decisions, "version": run.best.version}
        print("RESULT", json.dumps(result), flush=True)
    """
)


def _values(rng: random.Random) -> list[list[float]]:
    """Every epoch of every process improves, and the overall best changes hands between processes."""
    out: list[list[float]] = [[] for _ in range(PROCESSES)]
    for epoch in range(EPOCHS):
        order = rng.sample(range(PROCESSES), PROCESSES)
        for rank, proc in enumerate(order):
            out[proc].append(round(1.0 - 0.1 * epoch - 0.01 * rank - 0.001 * rng.random(), 6))
    return out


@dataclass
class _Repetition:
    experiment: str
    name: str
    go: Path
    values: list[list[float]]  # per process


class _Sweep:
    """Four long-lived training processes that run one sweep per repetition on the parent's signal."""

    def __init__(self, server: MlflowServer, tmp: Path, reps: list[_Repetition]) -> None:
        script = tmp / "child.py"
        script.write_text(CHILD, encoding="utf-8")
        self.procs: list[subprocess.Popen[str]] = []
        self.logs: list[Path] = []
        self.readers: list[LineReader] = []
        for i in range(PROCESSES):
            plan = [{"experiment": r.experiment, "name": r.name, "go": str(r.go), "values": r.values[i]}
                    for r in reps]
            env = dict(os.environ, MLFLOW_BEST_HOME=str(tmp / f"home-{i}"))
            # stderr to a file: MLflow logs a line per version, and a pipe nobody reads fills up
            # and blocks the child.
            self.logs.append(tmp / f"child-{i}.log")
            with open(self.logs[-1], "wb") as log:
                self.procs.append(
                    subprocess.Popen(
                        [sys.executable, str(script), server.url, json.dumps(plan)],
                        stdout=subprocess.PIPE, stderr=log, text=True, env=env, cwd=tmp,
                        preexec_fn=die_with_parent,
                    )
                )
            self.readers.append(LineReader(self.procs[-1]))
        try:
            assert self.read_lines() == ["ready"] * PROCESSES
        except BaseException:
            self.close()
            raise

    def read_lines(self, timeout: float = 180.0) -> list[str]:
        """One line from each process (a hung or crashed process fails the test with its log)."""
        lines = []
        for reader, log in zip(self.readers, self.logs, strict=True):
            line: str | None = ""
            while line is not None and not line.startswith("RESULT "):  # MLflow prints lines of its own
                try:
                    line = reader.next(timeout)
                except TimeoutError as e:
                    pytest.fail(f"{e}; its log: {log.read_text()[-3000:]}")
            if line is None:
                reader.proc.wait(timeout=30)
                code = reader.proc.returncode
                pytest.fail(f"a sweep process exited with {code}: {log.read_text()[-3000:]}")
            lines.append(line[len("RESULT ") :])
        return lines

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()
            if p.stdout is not None:
                p.stdout.close()


def test_concurrent_runs_register_every_version_and_the_alias_ends_on_the_best(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    client = MlflowClient(mlflow_server.url)
    rng = random.Random(5)
    reps = [
        _Repetition(unique("sweep"), unique("sweep"), tmp_path / f"go-{i}", _values(rng))
        for i in range(REPETITIONS)
    ]
    sweep = _Sweep(mlflow_server, tmp_path, reps)
    try:
        for i, rep in enumerate(reps):
            t0 = time.monotonic()
            rep.go.touch()
            results = [json.loads(line) for line in sweep.read_lines()]
            took = time.monotonic() - t0
            _check(client, rep, results, i)
            versions = PROCESSES * EPOCHS
            print(f"\nsweep repetition {i}: {PROCESSES} processes, {versions} versions, {took:.1f} s")
    finally:
        sweep.close()


def _check(client: MlflowClient, rep: _Repetition, results: list[dict[str, Any]], i: int) -> None:
    # Every process decided on its own values alone, and every improvement became one version.
    for result in results:
        assert result["decisions"] == [True] * EPOCHS
    versions = client.search_model_versions(f"name='{rep.name}'")
    assert sorted(int(v.version) for v in versions) == list(range(1, PROCESSES * EPOCHS + 1))
    registered = sorted((v.tags["run_id"], int(v.tags["epoch"]), float(v.tags["value"])) for v in versions)
    expected = sorted(
        (str(r["run_id"]), epoch, value)
        for r, vals in zip(results, rep.values, strict=True)
        for epoch, value in enumerate(vals)
    )
    assert registered == expected, "a version is missing, duplicated, or carries another run's value"
    # The alias is on the best version across all runs, whichever process moved it last.
    best_value = min(v for vals in rep.values for v in vals)
    holder = client.get_model_version_by_alias(rep.name, "best")
    assert float(holder.tags["value"]) == best_value, (
        f"repetition {i}: @best is v{holder.version} ({holder.tags['value']}), the best is {best_value}"
    )
    # One experiment, one run per process, each tagged with its own best version.
    experiment = client.get_experiment_by_name(rep.experiment)
    assert experiment is not None
    assert len(client.search_runs([experiment.experiment_id])) == PROCESSES
    for result in results:
        assert client.get_run(result["run_id"]).data.tags["mlflow_best.best_version"] == result["version"]


def test_alias_moves_converge_when_writers_collide(mlflow_server: MlflowServer) -> None:
    """Many writers register a version and move the alias in the same instant, round after round.

    The processes above rarely collide in the few milliseconds that matter; here a barrier makes
    every round a collision, so a check-then-write race in move_alias_to_best would show.
    """
    writers, rounds = 6, 6
    client = MlflowClient(mlflow_server.url)
    name = unique("collide")
    ensure_registered_model(client, name)
    experiment = client.create_experiment(unique("collide"))
    run_id = client.create_run(experiment).info.run_id
    criterion = Criterion("min")
    rng = random.Random(7)
    barrier = threading.Barrier(writers)
    errors: list[BaseException] = []

    def writer(value: float, delay: float) -> None:
        try:
            barrier.wait(timeout=60)
            time.sleep(delay)  # staggered, so that creations and reads interleave
            mv = client.create_model_version(
                name, source=f"runs:/{run_id}/ckpt-{value}", run_id=run_id,
                tags={"monitor": "val_loss", "mode": "min", "value": repr(value), "epoch": "0"},
            )
            # As the publisher calls it: with its own version, whose holder read may be skipped.
            move_alias_to_best(client, name, "best", "val_loss", criterion, mine=str(mv.version))
        except BaseException as e:
            errors.append(e)

    for r in range(rounds):
        values = [round(1.0 - r * 0.1 - 0.01 * rng.random(), 6) for _ in range(writers)]
        threads = [threading.Thread(target=writer, args=(v, rng.uniform(0, 0.08))) for v in values]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors, errors
        holder = client.get_model_version_by_alias(name, "best")
        assert float(holder.tags["value"]) == min(values), f"round {r}: @best is {holder.tags['value']}"
    assert len(client.search_model_versions(f"name='{name}'")) == rounds * writers
