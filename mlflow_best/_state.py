"""Capture and apply training state: model, optimizer, scheduler, GradScaler, RNG, epoch.

Everything captured here loads with ``torch.load(weights_only=True)`` and no allow-list: tensors,
dicts, lists, str, int, float, bool and None only (numpy's RNG state is turned into a tensor).
"""

from __future__ import annotations

import copy
import queue
import random
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

StateTree = Any  # nested dicts / lists / tuples of tensors and plain Python values


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """Return the user's module under DDP / DataParallel / ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, torch.nn.Module):
            model = model._orig_mod
        else:
            return model


def capture_rng(generators: Mapping[str, torch.Generator] | None = None) -> dict[str, Any]:
    """The RNG states of torch (CPU and CUDA), numpy, Python, and the user's named generators."""
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": int(version), "internal": list(internal), "gauss_next": gauss_next},
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def apply_rng(state: Mapping[str, Any], generators: Mapping[str, torch.Generator] | None = None) -> None:
    """Put back the RNG states that :func:`capture_rng` returned."""
    torch.set_rng_state(state["torch"].cpu())
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["kind"],
            np_state["keys"].cpu().numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        # One state per device it was saved from; a machine with fewer devices takes the first ones.
        for index, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state.cpu(), index)
    saved = state.get("generators") or {}
    for name, gen in (generators or {}).items():
        if name in saved:
            gen.set_state(saved[name].cpu())
        else:
            warnings.warn(
                f"mlflow_best: generators={{{name!r}: ...}} has no saved state in this checkpoint (saved: "
                f"{sorted(saved) or 'none'}); it keeps its current state, so its random draws (e.g. a "
                "DataLoader's shuffling) will not repeat the original run. Pass the same generators= "
                "names to track() as in the run that saved it",
                RuntimeWarning,
                stacklevel=3,
            )


@dataclass
class Snapshot:
    """A CPU copy of the training state, owned by the writer until ``release`` is called."""

    model: StateTree
    training: StateTree
    release: Callable[[], None]
    ready: Callable[[], None]  # blocks until asynchronous device-to-host copies are done


class SnapshotPool:
    """Copies state into reused CPU buffers; at most ``slots`` snapshots exist at once.

    ``take`` blocks while every slot is held by the writer: that is the back-pressure that keeps host
    memory at ``slots`` x the state size and never drops a checkpoint.
    """

    def __init__(self, slots: int = 2) -> None:
        # LIFO: the slot the writer released last (already allocated, pages touched) is reused, so the
        # second slot is only ever allocated when the first is still being written.
        self._free: queue.LifoQueue[dict[str, torch.Tensor]] = queue.LifoQueue()
        for _ in range(slots):
            self._free.put({})

    def take(self, model_state: StateTree, training_state: StateTree) -> Snapshot:
        buffers = self._free.get()
        devices: set[torch.device] = set()
        try:
            model_copy = _copy_tree(model_state, buffers, "m", devices)
            training_copy = _copy_tree(training_state, buffers, "t", devices)
            # One event per device, on the stream each copy was issued on (that device's current one).
            events = []
            for device in devices:
                event = torch.cuda.Event()  # type: ignore[no-untyped-call]
                event.record(torch.cuda.current_stream(device))
                events.append(event)
        except BaseException:
            self._free.put(buffers)  # a failed copy never keeps a slot (later improvements would wait)
            raise

        def ready() -> None:
            for event in events:
                event.synchronize()

        return Snapshot(model_copy, training_copy, release=lambda: self._free.put(buffers), ready=ready)


def _copy_tree(
    tree: StateTree, buffers: dict[str, torch.Tensor], path: str, devices: set[torch.device]
) -> StateTree:
    if isinstance(tree, torch.Tensor):
        return _copy_tensor(tree, buffers, path, devices)
    if isinstance(tree, Mapping):
        return {k: _copy_tree(v, buffers, f"{path}/{k}", devices) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        items = [_copy_tree(v, buffers, f"{path}/{i}", devices) for i, v in enumerate(tree)]
        return items if isinstance(tree, list) else tuple(items)
    return copy.deepcopy(tree)


def _copy_tensor(
    t: torch.Tensor, buffers: dict[str, torch.Tensor], path: str, devices: set[torch.device]
) -> torch.Tensor:
    t = t.detach()
    if t.is_sparse or t.is_quantized or t.layout != torch.strided:
        return t.to("cpu", copy=True)
    buf = buffers.get(path)
    if buf is None or buf.shape != t.shape or buf.dtype != t.dtype or buf.stride() != t.stride():
        # empty_like keeps the strides: a channels_last weight is saved (and restored) channels_last.
        buf = torch.empty_like(t, device="cpu", pin_memory=t.is_cuda)
        buffers[path] = buf
    if t.is_cuda:
        buf.copy_(t, non_blocking=True)  # issued on the current stream of t's device
        devices.add(t.device)
    else:
        buf.copy_(t)
    return buf


def to_plain(value: Any) -> Any:
    """A JSON-able copy of optimizer defaults and similar small configuration."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, Mapping):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)
