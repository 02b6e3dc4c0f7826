"""A team server that goes away: training never notices, and nothing is lost.

These tests stop and start their own `mlflow server` (not the session one other tests share):
an outage in the middle of a run, and a server that is still gone when the run ends.
"""

from __future__ import annotations

import statistics
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
import torch
from click.testing import CliRunner
from mlflow import MlflowClient

import mlflow_best
from mlflow_best.cli import main as cli
from tests._server import MlflowServer, require_postgres
from tests.helpers import TinyNet, train_step, unique

pytestmark = [pytest.mark.server, pytest.mark.slow]


@pytest.fixture(scope="module")
def outage_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    require_postgres()
    server = MlflowServer(tmp_path_factory.mktemp("outage-server")).start()
    yield server
    server.drop()


@pytest.fixture
def server_uri(outage_server: MlflowServer) -> Iterator[str]:
    if not outage_server.running:  # a failed earlier test may have left it stopped
        outage_server.start()
    mlflow.set_tracking_uri(outage_server.url)
    yield outage_server.url
    mlflow.set_tracking_uri(None)


def _val_loss(epoch: int) -> float:
    """Improves every 4th epoch (0, 4, 8, ...), worse in between: a realistic share of checkpoints."""
    return 10.0 - epoch // 4 + 0.1 * (epoch % 4)


def _sent_warnings(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if "could not send" in str(w.message)]


def _assert_everything_in_mlflow(client: MlflowClient, run_id: str, name: str, epochs: int) -> None:
    """Every epoch's metrics once, in order; one LoggedModel and one version per improvement, in order."""
    history = client.get_metric_history(run_id, "val_loss")
    steps = [m.step for m in sorted(history, key=lambda m: (m.timestamp, m.step))]
    assert steps == list(range(epochs)), "metrics missing, duplicated or out of order"
    assert {m.step: m.value for m in history} == {e: _val_loss(e) for e in range(epochs)}
    improvements = list(range(0, epochs, 4))
    versions = sorted(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))
    got = [int(v.tags["epoch"]) for v in versions]
    assert got == improvements, "versions missing, duplicated or out of order"
    assert [v.version for v in versions] == [str(i + 1) for i in range(len(improvements))]
    models = client.search_logged_models(
        experiment_ids=[client.get_run(run_id).info.experiment_id],
        filter_string=f"source_run_id = '{run_id}'",
    )
    assert sorted(int(m.tags["epoch"]) for m in models) == improvements
    assert all(str(m.status).endswith("READY") for m in models)
    best = client.get_model_version_by_alias(name, "best")
    assert best.version == versions[-1].version
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow_best.best_epoch"] == str(improvements[-1])
    assert run.data.tags["mlflow_best.best_version"] == versions[-1].version


def test_an_outage_mid_run_is_survived_without_losing_anything(
    outage_server: MlflowServer, server_uri: str, capfd: pytest.CaptureFixture[str]
) -> None:
    """The server dies (SIGKILL) after epoch 4 and is restarted on the same port while training goes on."""
    name, experiment = unique("outage"), unique("outage")
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    down_at, restart_after = 5, 10  # epochs
    restart: threading.Thread | None = None
    outage: dict[str, float] = {}
    during: list[float] = []
    epoch, last = 0, -1
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with mlflow_best.track(model, opt, experiment=experiment, registered_model=name, verbose=False,
                               offline_timeout=120) as run:
            while True:
                if epoch == down_at:
                    # Right after an improvement: its upload is likely cut half way, and the retry
                    # must complete it without a second LoggedModel or version.
                    outage["down"] = time.monotonic()
                    outage_server.stop(hard=True)
                if epoch == down_at + restart_after:
                    # Restarting takes ~15 s on 2 cores; training carries on meanwhile.
                    restart = threading.Thread(target=outage_server.start)
                    restart.start()
                if restart is not None and not restart.is_alive() and "up" not in outage:
                    outage["up"] = time.monotonic()
                    last = epoch + 3  # a few epochs more once it is back
                train_step(model, opt)
                time.sleep(0.25)  # the rest of a (very short) epoch
                t0 = time.perf_counter()
                metrics = {"val_loss": _val_loss(epoch), "train_loss": 1.0 / (epoch + 1)}
                improved = run.log_epoch(epoch, metrics)
                took = time.perf_counter() - t0
                if "down" in outage and "up" not in outage:
                    during.append(took)
                assert improved == (epoch % 4 == 0)
                if "up" in outage and epoch >= last:
                    break
                epoch += 1
    epochs = epoch + 1
    assert outage_server.running
    sent = _sent_warnings(record)
    assert len(sent) == 1, f"expected one warning for the whole outage, got {sent}"
    assert "training goes on" in sent[0] and str(run.staging_dir) in sent[0]
    assert "reachable again" in capfd.readouterr().err
    # A sanity bound only; the speed target lives in the benchmarks.
    assert max(during) < 1.0, f"log_epoch blocked for {max(during):.3f} s during the outage"
    _assert_everything_in_mlflow(MlflowClient(server_uri), run.run_id, name, epochs)
    restored = mlflow_best.restore(run.run_id)
    assert restored.epoch == max(range(0, epochs, 4))
    print(
        f"\noutage: {outage['up'] - outage['down']:.1f} s, {len(during)} epochs logged during it "
        f"({sum(1 for e in range(down_at, down_at + len(during)) if e % 4 == 0)} improvements); "
        f"log_epoch median {statistics.median(during) * 1e3:.2f} ms, max {max(during) * 1e3:.2f} ms; "
        f"after: {epochs} epochs of metrics and {len(range(0, epochs, 4))} versions in MLflow"
    )


def test_a_server_that_never_comes_back_raises_unsent_error_and_sync_uploads_later(
    outage_server: MlflowServer, server_uri: str
) -> None:
    name, experiment = unique("gone"), unique("gone")
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    epochs, down_after = 10, 4
    with (
        pytest.raises(mlflow_best.UnsentError, match=r"did not reach MLflow") as info,
        mlflow_best.track(
            model, opt, experiment=experiment, registered_model=name, verbose=False, offline_timeout=1.0
        ) as run,
    ):
        for epoch in range(epochs):
            if epoch == down_after + 1:
                # Right after an improvement: its upload is most likely in flight when the server dies.
                outage_server.stop(hard=True)
            train_step(model, opt)
            run.log_epoch(epoch, {"val_loss": _val_loss(epoch), "train_loss": 1.0})
    error = info.value
    message = str(error)
    # What did not arrive, and where each piece is kept.
    unsent_checkpoints = [e for e in range(down_after + 1, epochs) if e % 4 == 0]
    for e in unsent_checkpoints:
        folder = run.staging_dir / "checkpoints" / f"epoch={e:04d}-val_loss={_val_loss(e):.4f}"
        assert str(folder) in message, f"the local copy of epoch {e} is not named"
        assert (folder / "manifest.json").is_file()
    for e in range(down_after + 1, epochs):
        if e % 4:
            assert f"metrics of epoch {e}" in message  # an improvement's metrics travel with its checkpoint
    assert str(run.staging_dir) in message and "journal.jsonl" in message
    assert f"mlflow_best.sync('{run.run_id}')" in message and f"mlflow-best sync {run.run_id}" in message
    assert error.staging_dir == str(run.staging_dir)
    assert len(error.pending) >= epochs - down_after - 1

    with pytest.raises(mlflow_best.UnsentError, match="still did not reach MLflow"):
        mlflow_best.sync(run.run_id)  # still down: nothing is lost by trying

    outage_server.start()
    result = CliRunner().invoke(cli, ["sync", run.run_id])
    assert result.exit_code == 0, result.output
    assert f"of run {run.run_id}" in result.output
    assert mlflow_best.sync(run.run_id) == 0  # idempotent: nothing left to send
    _assert_everything_in_mlflow(MlflowClient(server_uri), run.run_id, name, epochs)
    restored = mlflow_best.restore(f"models:/{name}@best")
    assert restored.epoch == max(unsent_checkpoints)
    assert restored.run_id == run.run_id


def _run_into_an_outage(outage_server: MlflowServer, name: str, **kwargs: object) -> mlflow_best.Run:
    """Epoch 0 (best 1.0) reaches MLflow; the server dies; epoch 1 (best 0.5) and 2 stay journaled."""
    with (
        pytest.raises(mlflow_best.UnsentError, match=r"did not reach MLflow"),
        mlflow_best.track(TinyNet(), None, experiment=unique("e"), registered_model=name, verbose=False,
                          offline_timeout=1.0, **kwargs) as run,  # type: ignore[arg-type]
    ):
        run.log_epoch(0, {"val_loss": 1.0})
        deadline = time.monotonic() + 60
        while run.best.version is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert run.best.version == "1"
        outage_server.stop(hard=True)
        run.log_epoch(1, {"val_loss": 0.5})
        run.log_epoch(2, {"val_loss": 0.9})
    outage_server.start()
    return run


def test_a_stale_replay_never_moves_the_best_tags_backwards(
    outage_server: MlflowServer, server_uri: str, tmp_path: Path
) -> None:
    name = unique("stale")
    first = _run_into_an_outage(outage_server, name)
    client = MlflowClient(server_uri)
    # Another machine (another staging folder) resumes the run and gets further: best 0.2 at epoch 2.
    with mlflow_best.track(TinyNet(), None, resume=first.run_id, registered_model=name, verbose=False,
                           staging_dir=str(tmp_path / "elsewhere")) as second:
        for epoch, value in zip(range(second.start_epoch, 4), [0.4, 0.2, 0.3], strict=False):
            second.log_epoch(epoch, {"val_loss": value})
    assert client.get_run(first.run_id).data.tags["mlflow_best.best_epoch"] == "2"
    # Now the first machine's leftovers are synced: epoch 1 (0.5) is older and worse than what the run shows.
    assert mlflow_best.sync(first.run_id) >= 1
    tags = client.get_run(first.run_id).data.tags
    assert (tags["mlflow_best.best_epoch"], float(tags["mlflow_best.best_value"])) == ("2", 0.2)
    best = client.get_model_version_by_alias(name, "best")
    assert best.tags["epoch"] == "2"
    epochs = sorted(int(v.tags["epoch"]) for v in client.search_model_versions(f"name='{name}'"))
    assert epochs == [0, 1, 1, 2]  # the replayed improvement is registered too: nothing is lost


def test_a_resume_sends_the_previous_process_leftovers_first_and_the_run_stays_running(
    outage_server: MlflowServer, server_uri: str
) -> None:
    name = unique("leftovers")
    first = _run_into_an_outage(outage_server, name)
    client = MlflowClient(server_uri)
    with (
        pytest.warns(RuntimeWarning, match="epoch 2 was already logged"),
        mlflow_best.track(
            TinyNet(), None, resume=first.run_id, registered_model=name, verbose=False
        ) as again,
    ):
        # The leftovers went first: epoch 1's checkpoint is the one resumed from, epoch 2's metrics are in.
        assert again.start_epoch == 2
        assert client.get_run(first.run_id).info.status == "RUNNING"  # the old "run ended" was superseded
        again.log_epoch(2, {"val_loss": 0.25})
        again.log_epoch(3, {"val_loss": 0.9})
    versions = sorted(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))
    assert [int(v.tags["epoch"]) for v in versions] == [0, 1, 2]  # in order, each once
    steps = sorted(m.step for m in client.get_metric_history(first.run_id, "val_loss"))
    assert steps == [0, 1, 2, 2, 3]  # epoch 2 logged by both processes (the checkpoint was epoch 1)
    assert client.get_run(first.run_id).info.status == "FINISHED"


@pytest.mark.parametrize("verbose", [True, False], ids=["terminal", "log-file"])
def test_a_long_wait_at_exit_is_shown_each_second_on_a_terminal_and_rarely_in_a_log(
    outage_server: MlflowServer, server_uri: str, capfd: pytest.CaptureFixture[str], verbose: bool
) -> None:
    """The server hangs (SIGSTOP) while the last checkpoint is uploading, and answers again 2.5 s later."""
    import os
    import signal

    assert outage_server.proc is not None
    group = outage_server.proc.pid
    name = unique("wait")
    resumed = threading.Timer(2.5, os.killpg, (group, signal.SIGCONT))
    try:
        with mlflow_best.track(TinyNet(), None, experiment=unique("wait"), registered_model=name,
                               verbose=verbose) as run:
            run.log_epoch(0, {"val_loss": 1.0})
            deadline = time.monotonic() + 60
            while run.best.version is None and time.monotonic() < deadline:
                time.sleep(0.05)
            capfd.readouterr()
            os.killpg(group, signal.SIGSTOP)
            resumed.start()
            run.log_epoch(1, {"val_loss": 0.5})
    finally:
        resumed.cancel()
        os.killpg(group, signal.SIGCONT)
    waited = [line for line in capfd.readouterr().err.splitlines() if "upload(s) to MLflow…" in line]
    if verbose:  # 2.5 s or more of waiting: a line each second
        assert len(waited) >= 2, waited
        assert waited[0].startswith("mlflow_best: finishing ") and waited[-1].endswith(" s")
    else:  # a log file sees only a wait of 10 s or more (7.5 s of margin for a loaded machine)
        assert waited == []
    # The hang cost nothing: the version of epoch 1 is in MLflow and holds the alias.
    assert MlflowClient(server_uri).get_model_version_by_alias(name, "best").version == "2"
