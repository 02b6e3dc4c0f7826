"""The demo: a small MLP on scikit-learn's bundled digits data, trained through ``track``."""

from __future__ import annotations

import time
from dataclasses import dataclass

import mlflow
import torch
from torch import nn

from mlflow_best._shell import command


class DigitsMLP(nn.Module):
    """8x8 digit images (64 features) -> 10 classes."""

    def __init__(self, hidden: int = 64, dropout: float = 0.1) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(64, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out


@dataclass
class DigitsData:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits_data(seed: int = 0) -> DigitsData:
    """Train / validation / test splits of sklearn's bundled digits (nothing is downloaded)."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=g)
    xt = torch.tensor(x, dtype=torch.float32)[order] / 16.0
    yt = torch.tensor(y, dtype=torch.long)[order]
    a, b = int(0.7 * len(x)), int(0.85 * len(x))
    return DigitsData(xt[:a], yt[:a], xt[a:b], yt[a:b], xt[b:], yt[b:])


def train_epoch(model: nn.Module, opt: torch.optim.Optimizer, data: DigitsData, loader_gen: torch.Generator,
                batch: int = 64) -> float:
    """One pass over the training split in shuffled mini-batches; returns the mean training loss."""
    model.train()
    order = torch.randperm(len(data.x_train), generator=loader_gen)
    total = 0.0
    for i in range(0, len(order), batch):
        idx = order[i : i + batch]
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        total += float(loss.detach()) * len(idx)
    return total / len(order)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(cross-entropy loss, accuracy) of ``model`` on ``x, y``, in eval mode."""
    model.eval()
    logits = model(x)
    return float(nn.functional.cross_entropy(logits, y)), float((logits.argmax(1) == y).float().mean())


def run_demo(epochs: int = 15, lr: float = 0.01, hidden: int = 64, experiment: str = "digits",
             registered_model: str = "digits-mlp", seed: int = 0) -> str:
    """Train, print one line per epoch and a summary; return the run id."""
    import mlflow_best

    start = time.perf_counter()
    torch.manual_seed(seed)
    data = load_digits_data(seed)
    model = DigitsMLP(hidden=hidden)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
    loader_gen = torch.Generator().manual_seed(seed)
    print(f"mlflow_best demo: digits MLP, {epochs} epochs, tracking at {mlflow.get_tracking_uri()}")
    with mlflow_best.track(
        model, opt, monitor="val_loss", mode="min", experiment=experiment,
        registered_model=registered_model, alias="best", scheduler=sched,
        model_args={"hidden": hidden}, params={"lr": lr, "epochs": epochs, "seed": seed},
        generators={"loader": loader_gen}, verbose=True,
        input_example=data.x_val[:5],  # so every version records its signature
    ) as run:
        for epoch in range(run.start_epoch, epochs):
            tl = train_epoch(model, opt, data, loader_gen)
            sched.step()
            vl, va = evaluate(model, data.x_val, data.y_val)
            run.log_epoch(epoch, {"train_loss": tl, "val_loss": vl, "val_acc": va})
    # The run's own summary (best epoch, version, alias, how to open the UI) is printed by track();
    # the demo adds how to get the model back, and proves it by doing so.
    cli, mlflow_cli = command("mlflow-best"), command("mlflow")
    print(f"  restore it    {cli} restore models:/{registered_model}@best --out best.pt")
    print(f"                mlflow_best.restore(\"models:/{registered_model}@best\", device=\"cuda\")")
    print(f"  serve it      {mlflow_cli} models serve -m models:/{registered_model}@best --env-manager local")
    r = mlflow_best.restore(run.run_id)
    _, acc = evaluate(r.model, data.x_test, data.y_test)
    took = time.perf_counter() - start
    print(f"test accuracy of the restored best model (epoch {r.epoch}): {acc:.3f}  ({took:.1f} s in all)")
    return run.run_id
