"""Device mapping without a GPU: every tensor lands where ``device=`` says, whatever it was saved from.

The GPU side (train on CUDA, restore onto "cpu" and "cuda:0") is ``scripts/gpu_check.py``, run on a
machine that has one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.serialization as serialization

import mlflow_best
from mlflow_best import ConfigError, Restored
from tests.helpers import TinyNet, run_sequence


def _tensors(r: Restored) -> list[tuple[str, torch.Tensor]]:
    found = [(f"model.{k}", v) for k, v in r.model.state_dict().items()]
    assert r.optimizer is not None
    for i, state in enumerate(r.optimizer.state.values()):
        found += [(f"optimizer.state.{i}.{k}", v) for k, v in state.items() if isinstance(v, torch.Tensor)]
    return found


def _trained(snaps: dict[int, dict[str, torch.Tensor]]) -> str:
    run, _, _ = run_sequence([1.0, 0.5, 0.7], snapshots=snaps)
    return run.run_id


def test_restore_onto_the_cpu_gives_real_cpu_tensors_equal_to_the_best_epoch(sqlite_uri: str) -> None:
    snaps: dict[int, dict[str, torch.Tensor]] = {}
    run_id = _trained(snaps)
    for given in (False, True):
        model = TinyNet() if given else None
        opt = torch.optim.Adam(model.parameters()) if model is not None else None
        r = mlflow_best.restore(run_id, model, opt, device="cpu")
        tensors = _tensors(r)
        assert {name.split(".")[-1] for name, _ in tensors} >= {
            "weight",
            "bias",
            "exp_avg",
            "exp_avg_sq",
            "step",
        }
        for name, t in tensors:
            assert t.device == torch.device("cpu"), name
            assert not t.is_meta, name  # real data, not a shape-only placeholder
        for k, v in r.model.state_dict().items():
            assert torch.equal(v, snaps[1][k])
        assert all(p.device.type == "cpu" for p in r.model.parameters())


def test_restore_onto_the_meta_device_maps_every_tensor_there(sqlite_uri: str) -> None:
    # With no GPU, "meta" is the other device we can map onto: it shows map_location and the
    # optimizer-state move reach every tensor, not only the weights.
    run_id = _trained({})
    r = mlflow_best.restore(run_id, device="meta")
    for name, t in _tensors(r):
        if name.endswith(".step"):
            assert t.device.type == "cpu", name  # torch keeps a non-capturable step on the CPU
        else:
            assert t.is_meta, name


@pytest.fixture
def saved_as_cuda() -> Iterator[None]:
    """Make torch.save record every CPU storage as "cuda:0", as a checkpoint written on a GPU does."""

    def tag(storage: Any) -> str | None:
        return "cuda:0" if storage.device.type == "cpu" else None

    def never(storage: Any, location: str) -> None:
        return None

    serialization.register_package(0, tag, never)
    try:
        yield
    finally:
        serialization._package_registry[:] = [e for e in serialization._package_registry if e[1] is not tag]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks loading CUDA checkpoints where CUDA is absent")
def test_a_checkpoint_saved_on_cuda_restores_and_resumes_on_a_machine_without_cuda(
    sqlite_uri: str, saved_as_cuda: None
) -> None:
    snaps: dict[int, dict[str, torch.Tensor]] = {}
    run_id = _trained(snaps)
    r = mlflow_best.restore(run_id, device="cpu")
    # The files really say CUDA: without map_location torch refuses them on this machine.
    with pytest.raises(RuntimeError, match="Attempting to deserialize object on a CUDA device"):
        torch.load(r.path / "model.pt", weights_only=True)
    for name, t in _tensors(r):
        assert t.device.type == "cpu", name
    for k, v in r.model.state_dict().items():
        assert torch.equal(v, snaps[1][k])
    model = TinyNet()
    with mlflow_best.track(model, torch.optim.Adam(model.parameters(), lr=0.01), resume=run_id) as run:
        assert run.start_epoch == 2
        for k, v in model.state_dict().items():
            assert torch.equal(v, snaps[1][k])


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("gpu", "device='gpu' is not a torch device; pass 'cpu', 'cuda' or 'cuda:0'"),
        (
            "cuda:0",
            "device='cuda:0' was asked for but CUDA is not available here; pass device='cpu'",
        ),
    ],
)
def test_a_device_that_is_unknown_or_absent_is_refused_before_anything_is_loaded(
    tmp_path: Path, device: str, message: str
) -> None:
    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    not_even_a_checkpoint: Callable[[], Any] = lambda: mlflow_best.restore(str(tmp_path), device=device)  # noqa: E731
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        not_even_a_checkpoint()


class _Tied(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(10, 4)
        self.out = torch.nn.Linear(4, 10, bias=False)
        self.out.weight = self.emb.weight  # one Parameter under two names
        self.register_buffer("cache", torch.arange(3.0), persistent=False)


def test_a_rebuilt_model_keeps_tied_weights_and_non_persistent_buffers(sqlite_uri: str) -> None:
    model = _Tied()
    with mlflow_best.track(model, None, model_args={}) as run:
        run.log_epoch(0, {"val_loss": 1.0})
    r = mlflow_best.restore(run.run_id)
    assert r.model.out.weight is r.model.emb.weight
    assert torch.equal(r.model.emb.weight, model.emb.weight)
    assert torch.equal(r.model.cache, torch.arange(3.0))


def test_a_rebuilt_model_has_real_parameters_that_train(sqlite_uri: str) -> None:
    from tests.helpers import run_sequence

    run, _, _ = run_sequence([1.0])
    r = mlflow_best.restore(run.run_id)
    assert all(p.requires_grad and p.device.type == "cpu" for p in r.model.parameters())
    assert r.optimizer is not None
    before = r.model.fc1.weight.clone()
    r.model(torch.randn(3, 4)).sum().backward()
    r.optimizer.step()
    assert not torch.equal(before, r.model.fc1.weight)
    params = r.optimizer.param_groups[0]["params"]
    assert all(p is q for p, q in zip(params, r.model.parameters(), strict=True))
