"""mlflow_best quickstart: train a small classifier, keep its best epoch in MLflow, get it back.

    python examples/quickstart.py    # seconds on a CPU; uses $MLFLOW_TRACKING_URI, else ./mlflow.db

Nothing is downloaded: the data is scikit-learn's bundled 8x8 digits.
"""

from __future__ import annotations

import torch
from models import Net  # your model, from a module of your project
from sklearn.datasets import load_digits

import mlflow_best

digits = load_digits()
x = torch.tensor(digits.data, dtype=torch.float32) / 16
y = torch.tensor(digits.target)
loader_gen = torch.Generator().manual_seed(0)  # shuffles the batches; checkpointed with the run
order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
train_idx, val_idx = order[:1500], order[1500:]

torch.manual_seed(0)
model = Net(hidden=64)
optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.5)


def train_one_epoch(net: Net, opt: torch.optim.Optimizer) -> float:
    net.train()
    total = 0.0
    for batch in train_idx[torch.randperm(len(train_idx), generator=loader_gen)].split(64):
        loss = torch.nn.functional.cross_entropy(net(x[batch]), y[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
        total += loss.item() * len(batch)
    return total / len(train_idx)


@torch.no_grad()
def evaluate(net: torch.nn.Module) -> tuple[float, float]:
    net.eval()
    logits = net(x[val_idx])
    loss = torch.nn.functional.cross_entropy(logits, y[val_idx]).item()
    return loss, (logits.argmax(1) == y[val_idx]).float().mean().item()


with mlflow_best.track(
        model, optimizer,
        monitor="val_loss", mode="min",          # which metric decides
        experiment="quickstart",                  # created if missing
        registered_model="digits-quickstart",     # None: log checkpoints, register nothing
        alias="best",                             # moved to the best version (across runs)
        scheduler=scheduler,
        model_args={"hidden": 64},                # so restore() can rebuild Net without model=
        generators={"loader": loader_gen},        # its RNG state is checkpointed too
        ) as run:
    for epoch in range(run.start_epoch, 10):
        train_loss = train_one_epoch(model, optimizer)
        scheduler.step()
        val_loss, val_acc = evaluate(model)
        run.log_epoch(epoch, {"train_loss": train_loss, "val_loss": val_loss, "val_acc": val_acc})

print(f"run {run.run_id}: best val_loss={run.best.value:.4f} at epoch {run.best.epoch}, "
      f"version {run.best.version}")

# The run's best checkpoint, rebuilt: model, optimizer, scheduler (device="cuda:0" works too).
r = mlflow_best.restore(run.run_id, device="cpu")
print(f"restored {type(r.model).__name__} from epoch {r.epoch} (version {r.version}), "
      f"val_loss={evaluate(r.model)[0]:.4f}")

# The version the alias points at, weights only, in eval mode: for inference.
net = mlflow_best.load_model("models:/digits-quickstart@best")
print(f"models:/digits-quickstart@best: val_acc={evaluate(net)[1]:.3f}")
