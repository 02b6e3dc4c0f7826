"""Training code the project did not write: parameter groups, factories, MLflow habits, real names."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any

import mlflow
import pytest
import torch
from mlflow import MlflowClient
from torch import nn

import mlflow_best
from tests import _factories
from tests.helpers import TinyNet, train_step, unique

TAG = "mlflow_best."


@pytest.fixture(autouse=True)
def _fresh_warnings() -> None:
    """track warns once per process and class; each test here starts as a new process would."""
    from mlflow_best import _recipe

    _recipe._WARNED.clear()


def _runs(client: MlflowClient) -> list[Any]:
    exps = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(exps)


def _decay_split(model: nn.Module) -> list[dict[str, Any]]:
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0, "lr": 0.003}]


def _assert_same_optimizer(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert len(a["param_groups"]) == len(b["param_groups"])
    for ga, gb in zip(a["param_groups"], b["param_groups"], strict=True):
        assert {k: v for k, v in ga.items()} == {k: v for k, v in gb.items()}
    assert a["state"].keys() == b["state"].keys()
    for key, sa in a["state"].items():
        for name, value in sa.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["state"][key][name])), (key, name)


# -- 1. parameter groups ------------------------------------------------------------------------------
class WithHead(TinyNet):
    """A model with a part whose parameters join the optimizer later (add_param_group)."""

    def __init__(self, hidden: int = 8) -> None:
        super().__init__(hidden)
        self.head = nn.Linear(2, 2)


@pytest.mark.parametrize("given_model", [False, True], ids=["model=None", "model given"])
def test_parameter_groups_and_add_param_group_are_restored_exactly(store: str, given_model: bool) -> None:
    model = WithHead(8)
    opt = torch.optim.AdamW(
        [
            {"params": [model.fc1.weight, model.fc2.weight], "weight_decay": 0.01},
            {"params": [model.fc1.bias, model.fc2.bias], "weight_decay": 0.0, "lr": 0.003},
        ],
        lr=0.01,
    )
    saved: dict[int, dict[str, Any]] = {}
    values = [1.0, 0.8, 0.9, 0.5, 0.7]
    with mlflow_best.track(
        model, opt, model_args={"hidden": 8}, experiment=unique("groups"), verbose=False
    ) as run:
        for epoch, value in enumerate(values):
            if epoch == 2:
                opt.add_param_group({"params": list(model.head.parameters()), "lr": 0.02})
            opt.zero_grad()
            loss = model(torch.randn(8, 4)).pow(2).mean() + model.head(torch.randn(3, 2)).pow(2).mean()
            loss.backward()
            opt.step()
            saved[epoch] = {
                "opt": copy.deepcopy(opt.state_dict()),
                "model": copy.deepcopy(model.state_dict()),
            }
            run.log_epoch(epoch, {"val_loss": value})
    assert run.best.epoch == 3

    r = mlflow_best.restore(run.run_id, model=WithHead(8) if given_model else None)
    assert isinstance(r.model, WithHead)
    for k, v in saved[3]["model"].items():
        assert torch.equal(r.model.state_dict()[k], v)
    assert r.optimizer is not None
    assert [g["weight_decay"] for g in r.optimizer.param_groups] == [0.01, 0.0, 0.01]
    assert [g["lr"] for g in r.optimizer.param_groups] == [0.01, 0.003, 0.02]
    _assert_same_optimizer(r.optimizer.state_dict(), saved[3]["opt"])
    # Each group holds the same parameters (by name) as in training.
    names = {id(p): n for n, p in r.model.named_parameters()}
    assert [[names[id(p)] for p in g["params"]] for g in r.optimizer.param_groups] == [
        ["fc1.weight", "fc2.weight"],
        ["fc1.bias", "fc2.bias"],
        ["head.weight", "head.bias"],
    ]


def test_the_usual_no_weight_decay_split_restores_with_model_none(store: str) -> None:
    model = TinyNet(8)
    opt = torch.optim.AdamW(_decay_split(model), lr=0.01)
    saved = {}
    with mlflow_best.track(
        model, opt, experiment=unique("split"), model_args={"hidden": 8}, verbose=False
    ) as run:
        for epoch, value in enumerate([1.0, 0.5, 0.7]):
            train_step(model, opt)
            saved[epoch] = copy.deepcopy(opt.state_dict())
            run.log_epoch(epoch, {"val_loss": value})
    r = mlflow_best.restore(run.run_id)
    assert r.optimizer is not None and len(r.optimizer.param_groups) == 2
    _assert_same_optimizer(r.optimizer.state_dict(), saved[1])
    manifest_groups = r.manifest["optimizer"]["groups"]
    assert [g["params"] for g in manifest_groups] == [["fc1.weight", "fc2.weight"], ["fc1.bias", "fc2.bias"]]
    assert [g["weight_decay"] for g in manifest_groups] == [0.01, 0.0]
    # The model given, the optimizer rebuilt over its parameters with the same groups.
    r2 = mlflow_best.restore(run.run_id, model=TinyNet(8))
    assert r2.optimizer is not None
    _assert_same_optimizer(r2.optimizer.state_dict(), saved[1])


class NeedsModel(torch.optim.SGD):
    """An optimizer whose constructor takes more than params (as wrappers and some libraries do)."""

    def __init__(self, params: Any, model: nn.Module, lr: float = 0.1) -> None:
        super().__init__(params, lr=lr)


def test_an_optimizer_that_cannot_be_rebuilt_says_how_to_get_what_can_be_had(sqlite_uri: str) -> None:
    model = TinyNet(8)
    opt = NeedsModel(model.parameters(), model)
    with mlflow_best.track(model, opt, model_args={"hidden": 8}, verbose=False) as run:
        run.log_epoch(0, {"val_loss": 1.0})
    with pytest.raises(mlflow_best.CheckpointError, match=r"cannot be rebuilt.*pass optimizer=.*load_model"):
        mlflow_best.restore(run.run_id)
    # What can be had: the weights with the optimizer given.
    r = mlflow_best.restore(run.run_id, optimizer=torch.optim.SGD(TinyNet(8).parameters(), lr=0.1))
    assert r.epoch == 0


def test_an_optimizer_with_other_groups_than_saved_is_a_clear_error(sqlite_uri: str) -> None:
    model = TinyNet(8)
    opt = torch.optim.AdamW(_decay_split(model), lr=0.01)
    with mlflow_best.track(model, opt, model_args={"hidden": 8}, verbose=False) as run:
        train_step(model, opt)
        run.log_epoch(0, {"val_loss": 1.0})
    fresh = TinyNet(8)
    with pytest.raises(
        mlflow_best.ArchitectureMismatchError, match=r"2 parameter group.*given has 1.*same parameter"
    ):
        mlflow_best.restore(run.run_id, model=fresh, optimizer=torch.optim.AdamW(fresh.parameters()))


# -- 2. factories ---------------------------------------------------------------------------------------
def test_a_factory_built_model_is_rebuilt_by_restore(store: str) -> None:
    model = _factories.mlp(width=6, depth=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    weights = {}
    with mlflow_best.track(
        model,
        opt,
        model_factory=_factories.mlp,
        model_args={"width": 6, "depth": 3},
        experiment=unique("factory"),
        verbose=False,
    ) as run:
        for epoch, value in enumerate([1.0, 0.4, 0.6]):
            train_step(model, opt)
            weights[epoch] = copy.deepcopy(model.state_dict())
            run.log_epoch(epoch, {"val_loss": value})
    r = mlflow_best.restore(run.run_id)
    assert isinstance(r.model, nn.Sequential)
    assert r.manifest["model"]["factory"] == "tests._factories:mlp"
    for k, v in weights[1].items():
        assert torch.equal(r.model.state_dict()[k], v)
    assert r.optimizer is not None and r.optimizer.param_groups[0]["momentum"] == 0.9


def test_factories_that_cannot_be_found_by_name_are_refused_at_track(sqlite_uri: str) -> None:
    def nested(width: int = 8) -> nn.Module:
        return _factories.mlp(width)

    client = MlflowClient()
    model = _factories.mlp()
    with pytest.raises(mlflow_best.ConfigError, match=r"lambda, a nested function.*module level"):
        mlflow_best.track(model, model_factory=lambda: _factories.mlp())
    with pytest.raises(mlflow_best.ConfigError, match=r"cannot be imported by name"):
        mlflow_best.track(model, model_factory=nested)
    with pytest.raises(mlflow_best.ConfigError, match=r"model_factory=3 is not callable"):
        mlflow_best.track(model, model_factory=3)  # type: ignore[arg-type]
    assert _runs(client) == []


def test_model_args_that_do_not_fit_the_signature_are_refused_at_track(sqlite_uri: str) -> None:
    client = MlflowClient()
    with pytest.raises(
        mlflow_best.ConfigError, match=r"model_args=\{'hiden': 8\} do not fit .*TinyNet.*hiden"
    ):
        mlflow_best.track(TinyNet(8), model_args={"hiden": 8})
    with pytest.raises(mlflow_best.ConfigError, match=r"do not fit tests._factories:mlp"):
        mlflow_best.track(_factories.mlp(), model_factory=_factories.mlp, model_args={"layers": 3})
    assert _runs(client) == []


# -- 3. __main__ and models their class cannot rebuild -----------------------------------------------
def test_a_class_in_main_is_warned_about_once_at_track(sqlite_uri: str) -> None:
    Net = type("Net", (TinyNet,), {"__module__": "__main__"})
    with pytest.warns(
        RuntimeWarning, match=r"__main__:Net is defined in the script being run.*model_factory="
    ):
        mlflow_best.track(Net(8), model_args={"hidden": 8})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mlflow_best.track(Net(8), model_args={"hidden": 8})  # once


def test_a_sequential_is_found_unrebuildable_at_track_not_at_restore(sqlite_uri: str) -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    with pytest.warns(
        RuntimeWarning, match=r"would not rebuild this model.*Sequential.*missing keys.*model_factory="
    ):
        mlflow_best.track(model)


def test_restore_checks_the_rebuilt_architecture_and_names_the_class(sqlite_uri: str, tmp_path: Path) -> None:
    model = TinyNet(8)
    with mlflow_best.track(model, None, model_args={"hidden": 8}, verbose=False) as run:
        run.log_epoch(0, {"val_loss": 1.0})
    folder = mlflow_best.restore(run.run_id).path
    copy_dir = tmp_path / "copy"
    import shutil

    shutil.copytree(folder, copy_dir)
    manifest = json.loads((copy_dir / "manifest.json").read_text())
    manifest["model"]["args"] = {"hidden": 16}
    (copy_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(
        mlflow_best.ArchitectureMismatchError,
        match=r"rebuilt from the manifest \(tests.helpers:TinyNet\(\*\*\{'hidden': 16\}\)\).*58",
    ):
        mlflow_best.restore(str(copy_dir))


# -- 4. MLflow habits ---------------------------------------------------------------------------------
def test_set_experiment_is_the_default_and_an_explicit_experiment_wins(sqlite_uri: str) -> None:
    client = MlflowClient()
    exp = mlflow.set_experiment(unique("active"))
    with mlflow_best.track(TinyNet(8), model_args={"hidden": 8}, verbose=False) as run:
        mlflow.log_param("batch_size", 32)
        run.log_epoch(0, {"val_loss": 1.0})
    assert run.experiment_id == exp.experiment_id
    other = unique("explicit")
    with mlflow_best.track(TinyNet(8), model_args={"hidden": 8}, experiment=other, verbose=False) as run2:
        mlflow.log_param("batch_size", 64)
        run2.log_epoch(0, {"val_loss": 1.0})
    found = client.get_experiment_by_name(other)
    assert found is not None and run2.experiment_id == found.experiment_id
    runs = _runs(client)
    assert sorted(r.info.run_id for r in runs) == sorted([run.run_id, run2.run_id])
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert client.get_run(run.run_id).data.params["batch_size"] == "32"
    assert client.get_run(run2.run_id).data.params["batch_size"] == "64"


def test_track_inside_the_users_own_run_logs_into_it_and_leaves_it_open(store: str) -> None:
    client = MlflowClient()
    name = unique("joined")
    exp = mlflow.set_experiment(unique("outer"))
    with mlflow.start_run() as outer:
        mlflow.log_param("lr", 0.01)
        with mlflow_best.track(
            TinyNet(8), model_args={"hidden": 8}, registered_model=name, verbose=False
        ) as run:
            assert mlflow.active_run().info.run_id == outer.info.run_id  # type: ignore[union-attr]
            mlflow.log_param("seed", 7)
            for epoch, value in enumerate([1.0, 0.5]):
                run.log_epoch(epoch, {"val_loss": value})
        assert run.run_id == outer.info.run_id
        assert mlflow.active_run() is not None and mlflow.active_run().info.run_id == outer.info.run_id  # type: ignore[union-attr]
        assert client.get_run(outer.info.run_id).info.status == "RUNNING"
        mlflow.log_metric("test_acc", 0.9)
    data = client.get_run(outer.info.run_id)
    assert data.info.status == "FINISHED"
    assert {"lr", "seed", "monitor"} <= set(data.data.params)
    assert [m.step for m in client.get_metric_history(outer.info.run_id, "val_loss")] == [0, 1]
    assert "test_acc" in data.data.metrics
    assert [r.info.run_id for r in client.search_runs([exp.experiment_id])] == [outer.info.run_id]
    versions = client.search_model_versions(f"name='{name}'")
    assert {v.run_id for v in versions} == {outer.info.run_id} and len(versions) == 2


def test_track_inside_track_opens_a_nested_child_run(sqlite_uri: str) -> None:
    client = MlflowClient()
    with mlflow_best.track(
        TinyNet(8), model_args={"hidden": 8}, experiment=unique("sweep"), verbose=False
    ) as parent:
        for trial in range(2):
            with mlflow_best.track(TinyNet(8), model_args={"hidden": 8}, verbose=False) as child:
                assert mlflow.active_run().info.run_id == child.run_id  # type: ignore[union-attr]
                mlflow.log_param("trial", trial)
                child.log_epoch(0, {"val_loss": 1.0 - trial / 10})
            assert mlflow.active_run().info.run_id == parent.run_id  # type: ignore[union-attr]
            parent.log_epoch(trial, {"val_loss": 1.0 - trial / 10})
            got = client.get_run(child.run_id)
            assert got.data.tags["mlflow.parentRunId"] == parent.run_id
            assert got.data.params["trial"] == str(trial)
            assert got.info.status == "FINISHED"
            assert got.info.experiment_id == parent.experiment_id
    assert mlflow.active_run() is None


def test_resume_of_another_run_inside_an_active_run_is_refused(sqlite_uri: str) -> None:
    with mlflow_best.track(TinyNet(8), model_args={"hidden": 8}, verbose=False) as first:
        first.log_epoch(0, {"val_loss": 1.0})
    with mlflow.start_run() as active:
        with pytest.raises(mlflow_best.ConfigError, match=r"resume=.*names another run than the active"):
            mlflow_best.track(TinyNet(8), model_args={"hidden": 8}, resume=first.run_id).__enter__()
        assert mlflow.active_run().info.run_id == active.info.run_id  # type: ignore[union-attr]


# -- 5. names MLflow refuses ---------------------------------------------------------------------------
def test_a_metric_name_mlflow_refuses_raises_at_once_and_the_run_still_finishes(store: str) -> None:
    client = MlflowClient()
    with mlflow_best.track(
        TinyNet(8), model_args={"hidden": 8}, monitor="val_loss", experiment=unique("names"), verbose=False
    ) as run:
        run.log_epoch(0, {"val_loss": 1.0, "acc1": 0.1})
        with pytest.raises(
            mlflow_best.MetricError, match=r"metric name 'acc@1' is refused by MLflow.*e.g. 'acc_1'"
        ):
            run.log_epoch(1, {"val_loss": 0.5, "acc@1": 0.5})
        run.log_epoch(1, {"val_loss": 0.5, "acc1": 0.5})  # the same epoch again, fixed
        run.log_epoch(2, {"val_loss": 0.7, "acc1": 0.6})
    got = client.get_run(run.run_id)
    assert got.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.run_id, "acc1")] == [0, 1, 2]
    assert run.best.epoch == 1


def test_param_and_tag_names_mlflow_refuses_are_refused_before_any_run(sqlite_uri: str) -> None:
    client = MlflowClient()
    with pytest.raises(mlflow_best.ConfigError, match=r"params key 'lr@warmup' is refused by MLflow"):
        mlflow_best.track(TinyNet(8), params={"lr@warmup": 0.1})
    with pytest.raises(mlflow_best.ConfigError, match=r"tags key '../x' is refused by MLflow"):
        mlflow_best.track(TinyNet(8), tags={"../x": "y"})
    with pytest.raises(mlflow_best.ConfigError, match=r"monitor=.*characters"):
        mlflow_best.track(TinyNet(8), monitor="m" * 248)
    assert _runs(client) == []


# -- 6. monitor names with slashes ----------------------------------------------------------------------
def test_a_slashed_monitor_works_through_track_resume_and_restore(store: str) -> None:
    model = TinyNet(8)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    weights = {}
    kwargs: dict[str, Any] = dict(
        monitor="val/loss", model_args={"hidden": 8}, verbose=False, registered_model=unique("slash")
    )
    with mlflow_best.track(model, opt, experiment=unique("slash"), **kwargs) as run:
        for epoch, value in enumerate([1.0, 0.5, 0.7]):
            train_step(model, opt)
            weights[epoch] = copy.deepcopy(model.state_dict())
            run.log_epoch(epoch, {"val/loss": value})
    journal = [json.loads(line) for line in (run.staging_dir / "journal.jsonl").read_text().splitlines()]
    folders = [Path(op["folder"]) for op in journal if op["type"] == "checkpoint"]
    assert [f.name for f in folders] == ["epoch=0000-val_loss=1.0000", "epoch=0001-val_loss=0.5000"]
    assert all(f.parent == run.staging_dir / "checkpoints" for f in folders), folders
    r = mlflow_best.restore(run.run_id)
    assert r.epoch == 1
    for k, v in weights[1].items():
        assert torch.equal(r.model.state_dict()[k], v)
    lm = MlflowClient().get_logged_model(run.best.model_id)  # type: ignore[arg-type]
    assert lm.name == "epoch=0001-val_loss=0_5000"
    model2 = TinyNet(8)
    with (
        pytest.warns(RuntimeWarning, match="epoch 2 was already logged"),
        mlflow_best.track(
            model2, torch.optim.Adam(model2.parameters(), lr=0.01), resume=run.run_id, **kwargs
        ) as resumed,
    ):
        assert resumed.start_epoch == 2
        for k, v in weights[1].items():
            assert torch.equal(model2.state_dict()[k], v)
        resumed.log_epoch(2, {"val/loss": 0.4})
    assert mlflow_best.restore(resumed.run_id).epoch == 2


# -- 7. resume traps ------------------------------------------------------------------------------------
def test_resume_from_an_older_best_warns_naming_the_epochs_and_the_fix(sqlite_uri: str) -> None:
    with mlflow_best.track(
        TinyNet(8), model_args={"hidden": 8}, verbose=False, params={"resume": None}
    ) as run:
        for epoch, value in enumerate([1.0, 0.5, 0.7, 0.8]):
            run.log_epoch(epoch, {"val_loss": value})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with mlflow_best.track(
            TinyNet(8),
            model_args={"hidden": 8},
            verbose=False,
            resume=run.run_id,
            params={"resume": run.run_id},
        ) as again:
            assert again.start_epoch == 2
    texts = [str(w.message) for w in caught]
    assert any("epochs 2-3 were already logged" in t and "save_last=True" in t for t in texts), texts
    # Said at the user's `with` line, not inside the package.
    relogged = next(w for w in caught if "already logged" in str(w.message))
    assert relogged.filename == __file__, relogged.filename
    # The resume value in params is expected to change: no warning about it.
    assert not any("different values for params" in t for t in texts), texts


def test_changed_params_on_resume_are_named_with_old_and_new_values(sqlite_uri: str) -> None:
    with mlflow_best.track(TinyNet(8), model_args={"hidden": 8}, verbose=False, params={"lr": 0.1}) as run:
        run.log_epoch(0, {"val_loss": 1.0})
    resumed = mlflow_best.track(
        TinyNet(8), model_args={"hidden": 8}, verbose=False, resume=run.run_id, params={"lr": 0.2}
    )
    with pytest.warns(RuntimeWarning, match=r"different values for params \(lr: '0.1' -> '0.2'\).*first"):
        resumed.__enter__()
    resumed.__exit__(None, None, None)


# -- 8. memory format -----------------------------------------------------------------------------------
def test_the_rebuilt_model_keeps_channels_last(sqlite_uri: str) -> None:
    model = _factories.SmallConv(4).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with mlflow_best.track(model, opt, model_args={"channels": 4}, verbose=False) as run:
        loss = model(torch.randn(2, 3, 5, 5).to(memory_format=torch.channels_last)).sum()
        loss.backward()
        opt.step()
        run.log_epoch(0, {"val_loss": 1.0})
    r = mlflow_best.restore(run.run_id)
    weight = r.model.conv.weight  # type: ignore[union-attr]
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    assert torch.equal(weight, model.conv.weight)


# -- end to end: the official mnist example, adapted, killed and resumed --------------------------------
@pytest.mark.slow
def test_the_mnist_example_killed_and_resumed_equals_a_straight_run(sqlite_uri: str, tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    script = Path(__file__).parent / "data" / "mnist_like.py"
    env = dict(
        os.environ,
        MLFLOW_TRACKING_URI=sqlite_uri,
        MLFLOW_BEST_HOME=str(tmp_path / "home"),
        PYTHONPATH=str(Path(__file__).resolve().parents[1]),
    )

    def run(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, str(script), *args], env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    run("--epochs", "4", "--save", str(tmp_path / "straight.pt"))
    log = tmp_path / "first.log"
    with open(log, "w") as f:
        child = subprocess.Popen(
            [sys.executable, str(script), "--epochs", "4", "--stop-after", "2"],
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
            text=True,
        )
    client = MlflowClient(sqlite_uri)
    deadline = time.monotonic() + 120
    run_id = None
    try:
        while time.monotonic() < deadline:
            text = log.read_text()
            if run_id is None and "RUN " in text:
                run_id = text.split("RUN ", 1)[1].split()[0]
            if run_id and "READY" in text:
                tags = client.get_run(run_id).data.tags
                # Killed once epoch 1's state is in MLflow (a "last" or a "best" checkpoint).
                if tags.get(TAG + "last_epoch") == "1" or tags.get(TAG + "best_epoch") == "1":
                    break
            assert child.poll() is None, log.read_text()
            time.sleep(0.2)
        else:
            pytest.fail("the first run never reached epoch 1 in MLflow: " + log.read_text())
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert run_id is not None
    out = run("--epochs", "4", "--resume", run_id, "--save", str(tmp_path / "resumed.pt"))
    assert "EPOCH 2" in out and "EPOCH 0" not in out
    straight = torch.load(tmp_path / "straight.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=True)
    for k, v in straight["model"].items():
        assert torch.equal(v, resumed["model"][k]), k
    assert straight["scheduler"] == resumed["scheduler"]
    assert torch.equal(straight["rng"], resumed["rng"])
    _assert_same_optimizer(straight["optimizer"], resumed["optimizer"])
    steps = [m.step for m in client.get_metric_history(run_id, "test_loss")]
    assert steps == [0, 1, 2, 3]
    assert client.get_run(run_id).info.status == "FINISHED"
