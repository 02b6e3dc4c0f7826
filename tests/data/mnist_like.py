"""The official PyTorch `mnist` example (examples/mnist/main.py), on 8x8 digits, adapted to track.

The adaptation is the `with mlflow_best.track(...)` block, `range(run.start_epoch, ...)` and one
`run.log_epoch` after `scheduler.step()`; everything else is the example's own structure.
"""

import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim
from sklearn.datasets import load_digits
from torch.optim.lr_scheduler import StepLR
from torch.utils.data import DataLoader, TensorDataset

import mlflow_best


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, 1)
        self.conv2 = nn.Conv2d(8, 16, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(64, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = self.dropout2(x)
        return F.log_softmax(self.fc2(x), dim=1)


def train(model, train_loader, optimizer):
    model.train()
    for data, target in train_loader:
        optimizer.zero_grad()
        loss = F.nll_loss(model(data), target)
        loss.backward()
        optimizer.step()
    return loss.item()


def test(model, test_loader):
    model.eval()
    test_loss, correct = 0.0, 0
    with torch.no_grad():
        for data, target in test_loader:
            output = model(data)
            test_loss += F.nll_loss(output, target, reduction="sum").item()
            correct += output.argmax(dim=1).eq(target).sum().item()
    n = len(test_loader.dataset)
    return test_loss / n, correct / n


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1.0)
    parser.add_argument("--gamma", type=float, default=0.7)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--stop-after", type=int, default=None, help="wait to be killed after N epochs")
    parser.add_argument("--save", default=None)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    digits = load_digits()
    x = torch.tensor(digits.images[:600], dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target[:600])
    train_loader = DataLoader(TensorDataset(x[:480], y[:480]), batch_size=32, shuffle=True)
    test_loader = DataLoader(TensorDataset(x[480:], y[480:]), batch_size=60)

    model = Net()
    optimizer = optim.Adadelta(model.parameters(), lr=args.lr)
    scheduler = StepLR(optimizer, step_size=1, gamma=args.gamma)

    with mlflow_best.track(
        model,
        optimizer,
        scheduler=scheduler,
        monitor="test_loss",
        experiment="mnist",
        save_last=True,
        resume=args.resume,
        params=vars(args),
        verbose=False,
    ) as run:
        print("RUN", run.run_id, flush=True)
        for epoch in range(run.start_epoch, args.epochs):
            train_loss = train(model, train_loader, optimizer)
            test_loss, accuracy = test(model, test_loader)
            scheduler.step()
            run.log_epoch(epoch, {"train_loss": train_loss, "test_loss": test_loss, "accuracy": accuracy})
            print("EPOCH", epoch, flush=True)
            if args.stop_after is not None and epoch + 1 == args.stop_after:
                print("READY", flush=True)
                time.sleep(600)
    if args.save:
        torch.save(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": torch.get_rng_state(),
            },
            args.save,
        )


if __name__ == "__main__":
    main()
