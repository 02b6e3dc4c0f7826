from __future__ import annotations

import torch

import mlflow_best


def test_track_and_restore_roundtrip(store: str) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with mlflow_best.track(model, opt, experiment="smoke", registered_model="smoke-model",
                           model_args={"in_features": 4, "out_features": 2}) as run:
        for epoch, v in enumerate([1.0, 0.5, 0.7]):
            run.log_epoch(epoch, {"val_loss": v})
    assert run.best.epoch == 1 and run.best.version == "2"
    r = mlflow_best.restore(run.run_id)
    assert r.epoch == 1
