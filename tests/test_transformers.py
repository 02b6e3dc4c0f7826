"""The Hugging Face adapter: a real ``transformers.Trainer`` on a tiny BERT built from a config.

Nothing is downloaded: the model is made from ``BertConfig`` in the test and the hub is offline.
"""

from __future__ import annotations

import os
import textwrap
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from mlflow import MlflowClient

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from transformers import (
    BertConfig,
    BertForSequenceClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

import mlflow_best
from mlflow_best.transformers import TrackCallback, from_config
from tests.helpers import (
    assert_identical,
    child_env,
    finish_child,
    sigkill_when,
    start_child,
    unique,
    wait_for,
)


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def _bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, num_labels=2,
    )
    return BertForSequenceClassification(config)


class Tokens(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """Sequences of 8 token ids; the label is whether token 5 appears in the first half."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, 100, (n, 8), generator=g)
        self.ids[: n // 2, 1] = 5
        self.labels = (self.ids[:, :4] == 5).any(1).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        mask = torch.ones(8, dtype=torch.long)
        return {"input_ids": self.ids[i], "attention_mask": mask, "labels": self.labels[i]}


class Snapshots(TrainerCallback):
    """The weights at each evaluation, keyed by epoch (what the checkpoint of that epoch must hold)."""

    def __init__(self) -> None:
        self.states: dict[int, dict[str, torch.Tensor]] = {}

    def on_evaluate(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self.states[round(state.epoch) - 1] = {k: v.clone() for k, v in model.state_dict().items()}


class FailAt(TrainerCallback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if round(state.epoch) == self.epoch:
            raise RuntimeError(f"boom at the start of epoch {self.epoch}")


def _args(tmp_path: Path, epochs: int, **overrides: Any) -> TrainingArguments:
    kwargs: dict[str, Any] = {
        "output_dir": str(tmp_path / "hf"),
        "num_train_epochs": epochs,
        "per_device_train_batch_size": 8,
        "per_device_eval_batch_size": 16,
        "learning_rate": 5e-3,
        "weight_decay": 0.01,
        "eval_strategy": "epoch",
        "logging_strategy": "epoch",
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "disable_tqdm": True,
        "seed": 0,
    }
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def _trainer(model: Any, args: TrainingArguments, *callbacks: TrainerCallback, **kwargs: Any) -> Trainer:
    return Trainer(
        model=model, args=args, train_dataset=Tokens(32, 0), eval_dataset=Tokens(16, 1),
        callbacks=list(callbacks), **kwargs,
    )


def _versions(client: MlflowClient, name: str) -> list[tuple[str, str]]:
    found = client.search_model_versions(f"name='{name}'")
    return sorted(((str(v.version), v.tags["epoch"]) for v in found), key=lambda t: int(t[0]))


def test_versions_on_improvements_of_eval_loss_and_restore_rebuilds_the_model_from_its_config(
    store: str, tmp_path: Path
) -> None:
    name = unique("bert")
    track = TrackCallback(registered_model=name, experiment=unique("exp"), verbose=False)
    snapshots = Snapshots()
    trainer = _trainer(_bert(), _args(tmp_path, 4), track, snapshots)
    with track:
        trainer.train()

    run = track.last_run
    assert run is not None and track.run is None
    client = MlflowClient(store)
    info = client.get_run(run.run_id)
    assert info.info.status == "FINISHED"
    history = sorted(client.get_metric_history(run.run_id, "eval_loss"), key=lambda m: m.step)
    assert [m.step for m in history] == [0, 1, 2, 3]  # epoch indices, from the Trainer's float epochs
    improving, best = [], float("inf")
    for m in history:
        if m.value < best:
            improving, best = [*improving, m.step], m.value
    assert [e for _, e in _versions(client, name)] == [str(e) for e in improving]
    assert client.get_model_version_by_alias(name, "best").tags["epoch"] == str(improving[-1])
    assert [m.step for m in client.get_metric_history(run.run_id, "loss")] == [0, 1, 2, 3]  # training logs
    # The optimizer under accelerate's wrapper is recorded, not the wrapper.
    assert info.data.params["optimizer_class"] == "torch.optim.adamw:AdamW"

    # model=None: rebuilt from the recorded config by from_config, nothing downloaded.
    restored = mlflow_best.restore(f"models:/{name}@best")
    assert type(restored.model) is BertForSequenceClassification
    assert restored.model.config.hidden_size == 16
    assert restored.epoch == improving[-1]
    assert restored.manifest["model"]["factory"] == "mlflow_best.transformers:from_config"
    assert_identical(snapshots.states[improving[-1]], restored.model.state_dict())
    # The Trainer's AdamW has two parameter groups (decay / no decay); both come back.
    assert restored.optimizer is not None
    assert [g["weight_decay"] for g in restored.optimizer.param_groups] == [0.01, 0.0]


def test_metric_for_best_model_and_greater_is_better_are_the_default_monitor_and_mode(
    sqlite_uri: str, tmp_path: Path
) -> None:
    scores = iter([0.5, 0.75, 0.625, 0.875])
    name = unique("bert")
    track = TrackCallback(registered_model=name, verbose=False)
    args = _args(tmp_path, 4, metric_for_best_model="score", greater_is_better=True)
    trainer = _trainer(_bert(), args, track, compute_metrics=lambda _: {"score": next(scores)})
    with track:
        trainer.train()
    assert track.last_run is not None
    params = MlflowClient(sqlite_uri).get_run(track.last_run.run_id).data.params
    assert (params["monitor"], params["mode"]) == ("eval_score", "max")
    assert _versions(MlflowClient(sqlite_uri), name) == [("1", "0"), ("2", "1"), ("3", "3")]


def test_the_run_ends_failed_when_train_raises_and_keeps_the_best(sqlite_uri: str, tmp_path: Path) -> None:
    name = unique("bert")
    track = TrackCallback(registered_model=name, verbose=False)
    trainer = _trainer(_bert(), _args(tmp_path, 4), track, FailAt(2))
    with pytest.raises(RuntimeError, match="boom at the start of epoch 2"), track:
        trainer.train()
    assert track.last_run is not None and track.run is None
    client = MlflowClient(sqlite_uri)
    assert client.get_run(track.last_run.run_id).info.status == "FAILED"
    assert [m.step for m in client.get_metric_history(track.last_run.run_id, "eval_loss")] == [0, 1]
    epochs = [e for _, e in _versions(client, name)]
    assert epochs in (["0"], ["0", "1"])
    assert mlflow_best.restore(f"models:/{name}@best").epoch == int(epochs[-1])


def test_without_the_with_block_a_warning_says_a_crash_would_leave_the_run_running(
    sqlite_uri: str, tmp_path: Path
) -> None:
    track = TrackCallback(verbose=False)
    with pytest.warns(RuntimeWarning, match=r"not used as `with track: trainer.train\(\)`"):
        _trainer(_bert(), _args(tmp_path, 1), track).train()
    assert track.last_run is not None
    assert MlflowClient(sqlite_uri).get_run(track.last_run.run_id).info.status == "FINISHED"


def test_report_to_mlflow_is_refused_so_there_is_one_run(sqlite_uri: str, tmp_path: Path) -> None:
    track = TrackCallback(verbose=False)
    with pytest.raises(mlflow_best.ConfigError, match=r"report_to=\['mlflow'\].*report_to=\"none\""):
        _trainer(_bert(), _args(tmp_path, 1, report_to="mlflow"), track)
    assert track.last_run is None
    assert MlflowClient(sqlite_uri).search_runs(["0"]) == []


def test_resume_without_the_checkpoint_folder_is_refused_before_any_epoch(
    sqlite_uri: str, tmp_path: Path
) -> None:
    first = TrackCallback(save_last=True, verbose=False)
    with first:
        _trainer(_bert(), _args(tmp_path, 1), first).train()
    assert first.last_run is not None
    run_id = first.last_run.run_id
    track = TrackCallback(resume=run_id, verbose=False)
    trainer = _trainer(_bert(), _args(tmp_path, 2), track)
    starts_wrong = r"at epoch 1, but the Trainer starts at epoch 0"
    with pytest.raises(mlflow_best.ConfigError, match=starts_wrong), track:
        trainer.train()
    with pytest.raises(mlflow_best.ConfigError, match=r"needs the run to continue"):
        TrackCallback(verbose=False).checkpoint_for(trainer)
    with pytest.raises(mlflow_best.ConfigError, match=r"eval_strategy='epoch'"):
        by_steps = _args(tmp_path, 2, eval_strategy="steps", eval_steps=2)
        track.checkpoint_for(_trainer(_bert(), by_steps, track))
    assert [m.step for m in MlflowClient(sqlite_uri).get_metric_history(run_id, "eval_loss")] == [0]


def test_arguments_are_checked_when_the_callback_is_made() -> None:
    with pytest.raises(mlflow_best.ConfigError, match=r"TrackCallback\(model=...\) is taken from the"):
        TrackCallback(model=None)
    with pytest.raises(mlflow_best.ConfigError, match=r"mode='best' is not a known mode"):
        TrackCallback(mode="best")


def test_from_config_builds_only_transformers_models() -> None:
    config = _bert().config.to_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        built = from_config("BertForSequenceClassification", config)
    assert type(built) is BertForSequenceClassification
    with pytest.raises(mlflow_best.ConfigError, match=r"architecture='os' is not a PreTrainedModel class"):
        from_config("os", config)
    with pytest.raises(mlflow_best.ConfigError, match=r"architecture='AutoConfig' is not a PreTrainedModel"):
        from_config("AutoConfig", config)


# -- exact resume ----------------------------------------------------------------------------------
# The child trains the tiny BERT (dropout on) for 4 epochs with AdamW and the Trainer's linear
# schedule. In phase "first" it stops at the start of epoch 2 and waits to be killed, after the
# callback logged (and checkpointed, save_last=True) epoch 1; "resume" continues the run with
# resume_from_checkpoint=track.checkpoint_for(trainer).
HF_SCRIPT = textwrap.dedent(
    """
    import sys, time
    import torch
    from transformers import TrainerCallback
    from mlflow_best.transformers import TrackCallback
    from tests.test_transformers import _args, _bert, _trainer

    phase, out, home = sys.argv[1], sys.argv[2], sys.argv[3]
    resume = sys.argv[4] if len(sys.argv) > 4 else None

    class Pause(TrainerCallback):
        def on_epoch_begin(self, args, state, control, **kwargs):
            if phase == "first" and round(state.epoch) == 2:
                print("READY", flush=True)
                time.sleep(600)

    track = TrackCallback(experiment="resume", save_last=True, resume=resume, verbose=False)
    trainer = _trainer(_bert(), _args(__import__("pathlib").Path(home), 4), track, Pause())
    with track:
        trainer.train(resume_from_checkpoint=track.checkpoint_for(trainer) if resume else None)
    torch.save(
        {
            "model": trainer.model.state_dict(),
            "optimizer": trainer.optimizer.optimizer.state_dict(),
            "scheduler": trainer.lr_scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "start_epoch": track.last_run.start_epoch,
            "global_step": trainer.state.global_step,
        },
        out,
    )
    """
)


@pytest.mark.slow
def test_a_sigkilled_train_resumed_with_checkpoint_for_equals_a_straight_train(
    sqlite_uri: str, tmp_path: Path, _sqlite_template: Path
) -> None:
    from tests.conftest import new_sqlite_store

    script = tmp_path / "train.py"
    script.write_text(HF_SCRIPT)
    straight_log = tmp_path / "straight.log"
    straight = start_child(
        script,
        ["full", str(tmp_path / "straight.pt"), str(tmp_path / "o1")],
        child_env(new_sqlite_store(_sqlite_template, tmp_path / "straight"), tmp_path / "h1", []),
        straight_log,
    )
    first_log = tmp_path / "first.log"
    first = start_child(
        script, ["first", str(tmp_path / "first.pt"), str(tmp_path / "o2")],
        child_env(sqlite_uri, tmp_path / "h2", []), first_log,
    )
    client = MlflowClient(sqlite_uri)
    try:
        wait_for(lambda: "READY" in first_log.read_text(errors="replace"), first, first_log, "READY")
        experiment = client.get_experiment_by_name("resume")
        assert experiment is not None
        (run_id,) = [r.info.run_id for r in client.search_runs([experiment.experiment_id])]

        def epoch_1_is_in_mlflow() -> bool:
            tags = client.get_run(run_id).data.tags
            return "1" in (tags.get("mlflow_best.last_epoch"), tags.get("mlflow_best.best_epoch"))

        sigkill_when(epoch_1_is_in_mlflow, first, first_log, "epoch 1")
    finally:
        if first.poll() is None:
            first.kill()
    assert client.get_run(run_id).info.status == "RUNNING"

    resumed_log = tmp_path / "resumed.log"
    resumed = start_child(
        script, ["resume", str(tmp_path / "resumed.pt"), str(tmp_path / "o3"), run_id],
        child_env(sqlite_uri, tmp_path / "h3", []), resumed_log,
    )
    finish_child(resumed, resumed_log, timeout=300)
    finish_child(straight, straight_log, timeout=300)

    a = torch.load(tmp_path / "straight.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed.pt", weights_only=True)
    assert (a["start_epoch"], b["start_epoch"]) == (0, 2)
    assert a["global_step"] == b["global_step"] == 16  # 4 epochs of 4 batches
    counted = sum(assert_identical(a[k], b[k], k) for k in ("model", "optimizer", "scheduler", "torch_rng"))
    assert counted > 2 * len(a["model"])
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    for metric in ("eval_loss", "loss"):
        assert sorted(m.step for m in client.get_metric_history(run_id, metric)) == [0, 1, 2, 3], metric
    # The written folder: the Trainer's own checkpoint layout, without an optimizer.pt of its own.
    folder = tmp_path / "o3" / "hf" / "mlflow_best" / run_id / "checkpoint-8"
    assert {"model.safetensors", "rng_state.pth", "trainer_state.json"} <= {f.name for f in folder.iterdir()}
    assert not (folder / "optimizer.pt").exists()
