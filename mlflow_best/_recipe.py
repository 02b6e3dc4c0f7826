"""How a model and its optimizer are recorded at ``track`` and rebuilt at ``restore``: one format.

The manifest's ``model`` section is ``{"class": "pkg.mod:Net", "args": {...}, "factory": "pkg.mod:fn"
| None, "memory_format": "channels_last" | None}`` and its ``optimizer`` section is ``{"class",
"defaults", "groups": [{"params": [parameter names in the model], <hyperparameters>}]}``. Both are
written here (``model_recipe`` / ``OptimizerRecipe``) and read here (``plan_model`` /
``rebuild_optimizer``), so the two sides cannot drift apart.

Checks that would otherwise fail at restore, in another program, days later, happen at ``track``:
``model_args`` are bound against the signature, a lambda or nested factory is refused, and the
model is built once on the ``meta`` device from what will be recorded, so a model that cannot be
rebuilt (an ``nn.Sequential``, a class defined in ``__main__``) is said at once.
"""

from __future__ import annotations

import importlib
import inspect
import random
import sys
import typing
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mlflow_best._errors import ArchitectureMismatchError, CheckpointError, ConfigError
from mlflow_best._state import to_plain, unwrap_model

_WARNED: set[str] = set()


def object_path(obj: Any) -> str:
    """``package.module:QualName`` of a class or function, the form restore finds it by."""
    return f"{obj.__module__}:{obj.__qualname__}"


def class_path(obj: object) -> str:
    """``package.module:QualName`` of an object's class."""
    return object_path(type(obj))


# -- at track ---------------------------------------------------------------------------------------
def factory_path(factory: Any) -> str:
    """The import path of ``track(model_factory=...)``; refuse what cannot be found again by name."""
    if not callable(factory):
        raise ConfigError(
            f"model_factory={factory!r} is not callable; pass a module-level function or class that "
            "builds the model from model_args, e.g. model_factory=torchvision.models.resnet18"
        )
    module = getattr(factory, "__module__", None)
    qual = getattr(factory, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qual, str) or "<" in qual:
        raise ConfigError(
            f"model_factory={factory!r} cannot be imported by name ({module}:{qual}): a lambda, a nested "
            "function or a functools.partial is not recorded. Define the factory at module level (def "
            "build(**kw) in a module of your project) and pass its model_args"
        )
    found = _lookup(module, qual)
    if found is not factory:
        raise ConfigError(
            f"model_factory={factory!r}: {module}:{qual} does not name this object (it was replaced or "
            "decorated under another name); pass the module-level callable itself"
        )
    return f"{module}:{qual}"


def _lookup(module: str, qual: str) -> Any:
    obj: Any = sys.modules.get(module)
    for part in qual.split("."):
        obj = getattr(obj, part, None)
    return obj


def check_model_recipe(
    model: torch.nn.Module, factory: Any, model_args: dict[str, Any] | None, *, warn: bool = True
) -> None:
    """Refuse ``model_args`` that do not fit; warn once when restore could not rebuild ``model``.

    Raises:
        ConfigError: ``model_args`` do not bind to the factory's or class's signature.
    """
    net = unwrap_model(model)
    builder: Any = factory if factory is not None else type(net)
    shown = object_path(builder) if factory is not None else class_path(net)
    args = model_args or {}
    try:
        signature = inspect.signature(builder)
    except (TypeError, ValueError):
        signature = None
    if signature is not None:
        try:
            signature.bind(**args)
        except TypeError as e:
            if model_args is not None or factory is not None:
                raise ConfigError(
                    f"model_args={model_args!r} do not fit {shown}{signature} ({e}); pass the keyword "
                    "arguments it takes, so restore can rebuild the model"
                ) from e
            _warn_once(
                shown,
                f"mlflow_best: restore(ref) with model=None will not be able to rebuild {shown}: it needs "
                f"arguments ({e}) and no model_args were given. Pass model_args={{...}} (or "
                "model_factory=) to track, or pass model= when restoring",
                warn,
            )
            return
    if builder.__module__ == "__main__":
        _warn_once(
            shown,
            f"mlflow_best: {shown} is defined in the script being run (__main__), so restore(ref) in another "
            "program or notebook cannot find it (or finds another class of that name). Move it into a "
            "module you import, pass model_factory=, or pass model= when restoring",
            warn,
        )
    problem = _dry_build(net, builder, args)
    if problem:
        _warn_once(
            shown,
            f"mlflow_best: restore(ref) with model=None would not rebuild this model: {shown}(**{args!r}) "
            f"{problem}. Pass model_factory= a module-level function that builds it (with model_args), "
            "or pass model= when restoring",
            warn,
        )


def _dry_build(net: torch.nn.Module, builder: Any, args: dict[str, Any]) -> str | None:
    """Build from the recipe on the meta device and compare keys and shapes with the real model."""
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            built = builder(**args)
    except Exception as e:
        return f"raises {type(e).__name__}: {e}"
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    if not isinstance(built, torch.nn.Module):
        return f"returns a {type(built).__name__}, not a torch.nn.Module"
    mismatch = state_mismatch(built.state_dict(), net.state_dict())
    return f"builds a different architecture ({mismatch})" if mismatch else None


def _warn_once(key: str, message: str, warn: bool) -> None:
    if warn and key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=5)


def model_recipe(
    model: torch.nn.Module, factory: str | None, model_args: dict[str, Any] | None
) -> dict[str, Any]:
    """The manifest's ``model`` section."""
    net = unwrap_model(model)
    recipe: dict[str, Any] = {
        "class": class_path(net),
        "args": model_args,
        "factory": factory,
        "parameters": sum(p.numel() for p in net.parameters()),
    }
    if _is_channels_last(net):
        recipe["memory_format"] = "channels_last"
    return recipe


def _is_channels_last(net: torch.nn.Module) -> bool:
    for p in net.parameters():
        if p.dim() == 4:
            return p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
    return False


class OptimizerRecipe:
    """Writes the manifest's ``optimizer`` section; parameter names are looked up once per model."""

    def __init__(self, model: torch.nn.Module) -> None:
        self._model = unwrap_model(model)
        self._names: dict[int, str] | None = None

    def __call__(self, opt: torch.optim.Optimizer) -> dict[str, Any]:
        if self._names is None:
            self._names = {id(p): n for n, p in self._model.named_parameters()}
        names = self._names
        groups = []
        for group in opt.param_groups:
            params = [names.get(id(p)) for p in group["params"]]
            if any(n is None for n in params):
                # A parameter that is not the model's (refreshed once: the model may have grown).
                self._names = names = {id(p): n for n, p in self._model.named_parameters()}
                params = [names.get(id(p)) for p in group["params"]]
            hyper = {k: to_plain(v) for k, v in group.items() if k != "params"}
            groups.append({"params": params, **hyper})
        return {"class": class_path(opt), "defaults": to_plain(opt.defaults), "groups": groups}


# -- at restore -------------------------------------------------------------------------------------
def resolve(path: Any, field: str) -> Any:
    """The object a recorded ``module:QualName`` names, from a module this process already imported.

    Nothing is imported: a checkpoint (or whoever can write to the tracking server) must not be able
    to make restore run a module's import-time code. The user imports the module that defines the
    model (``import mymodels``) and restore then finds the class there.
    """
    if not isinstance(path, str) or path.count(":") != 1:
        raise CheckpointError(f"manifest field {field!r} is {path!r}, expected 'module:QualName'")
    module_name, qual = path.split(":", 1)
    what = "model" if field.startswith("model") else "optimizer"
    if not module_name or not qual or "<" in qual:
        raise CheckpointError(f"manifest field {field!r} is {path!r}, expected 'module:QualName'")
    if module_name in _OWN_MODULES:
        importlib.import_module(module_name)  # part of mlflow_best itself (the demo's model)
    if module_name not in sys.modules:
        raise ConfigError(
            f"the checkpoint names {path!r} (manifest field {field!r}), but module {module_name!r} is not "
            f"imported in this process; restore never imports what a checkpoint names. If you trust it, "
            f"`import {module_name}` before restore (CLI: --import {module_name}), or pass {what}= an "
            "instance built as in training"
        )
    obj: Any = sys.modules[module_name]
    for part in qual.split("."):
        obj = getattr(obj, part, _MISSING)
        if obj is _MISSING:
            raise ConfigError(
                f"the checkpoint names {path!r} (manifest field {field!r}), which module {module_name!r} "
                f"does not define here; pass {what}= an instance built as in training"
            )
    return obj


_MISSING = object()
# Modules of this package that define models and import nothing beyond torch.
_OWN_MODULES = frozenset({"mlflow_best._demo"})


def trusted_factory(path: str, given: Any = None, *, trust_code: bool = False) -> Any:
    """The recorded factory, if calling it is the user's choice; else a ConfigError saying how to choose.

    A factory is a plain callable: its type says nothing of what it does (``os.system`` is a callable
    too). It is called when the user passes the same factory to restore, when its module is imported
    and its return annotation is an ``nn.Module`` subclass (torchvision's builders are annotated), or
    with ``trust_code=True`` (Hugging Face's ``trust_remote_code`` convention).
    """
    if given is not None:
        if not callable(given) or object_path(given) != path:
            shown = object_path(given) if callable(given) else repr(given)
            raise ConfigError(
                f"model_factory={shown} was passed to restore, but the checkpoint was built by {path!r}; "
                "pass that factory, or model= an instance"
            )
        return given
    factory = resolve(path, "model.factory")
    if not callable(factory):
        raise CheckpointError(f"manifest field 'model.factory' names {path!r}, not a callable; refused")
    if trust_code or (isinstance(factory, type) and issubclass(factory, torch.nn.Module)):
        return factory
    if _returns_module(factory):
        return factory
    raise ConfigError(
        f"the checkpoint's model_factory {path!r} does not declare that it returns a torch.nn.Module (no "
        "return annotation), so restore will not call it on the checkpoint's word. Pass "
        "model_factory= that function to restore, trust_code=True if you trust this checkpoint, or model= "
        "an instance"
    )


def _returns_module(factory: Any) -> bool:
    try:
        hints = typing.get_type_hints(factory)
    except Exception:
        return False
    ret = hints.get("return")
    return isinstance(ret, type) and issubclass(ret, torch.nn.Module)


@dataclass
class ModelPlan:
    """A model rebuilt from its manifest on the ``meta`` device: checked before anything is allocated."""

    builder: Any
    args: dict[str, Any]
    shown: str
    meta: torch.nn.Module
    memory_format: str | None

    def state_bytes(self) -> int:
        """What the model's state_dict takes in memory (each tensor once)."""
        seen: dict[int, int] = {}
        for t in self.meta.state_dict().values():
            if isinstance(t, torch.Tensor):
                seen[id(t)] = t.numel() * t.element_size()
        return sum(seen.values())

    def check_size(self, file: str, file_bytes: int, declared_parameters: Any = None) -> None:
        """Refuse a recipe that builds more than the checkpoint's weights file can hold.

        The weights file holds every tensor of the state_dict, so a model needing more bytes than
        it has cannot be the checkpoint's: ``model_args`` were changed to allocate memory (a denial of
        service), or the class of that name here is another one.
        """
        need = self.state_bytes()
        if need > file_bytes:
            raise CheckpointError(
                f"{file}: the manifest's recipe {self.shown}(**{_short(self.args)}) would need {need:,} "
                "bytes, "
                f"but model.pt holds {file_bytes:,}: the recipe does not describe these weights (changed "
                "model_args?). Nothing was allocated; pass model= an instance of the trained architecture"
            )
        if isinstance(declared_parameters, int) and not isinstance(declared_parameters, bool):
            count = sum(p.numel() for p in self.meta.parameters())
            if count != declared_parameters:
                raise ArchitectureMismatchError(
                    f"{file} does not fit the model rebuilt from the manifest ({self.shown}(**"
                    f"{_short(self.args)})): it builds {count:,} parameters, the manifest declares "
                    f"{declared_parameters:,}. Nothing was loaded; pass model= an instance of the trained "
                    "architecture"
                )

    def build(self, state: Mapping[str, Any], target: torch.device, source: str) -> torch.nn.Module:
        """The model with ``state`` loaded, on ``target``."""
        model = self.meta
        mismatch = state_mismatch(state, model.state_dict())
        if mismatch:
            raise ArchitectureMismatchError(
                f"{source} does not fit the model rebuilt from the manifest ({self.shown}(**{self.args!r})): "
                f"{mismatch}. The class of that name here differs from the one trained; pass model= an "
                "instance of the trained architecture"
            )
        # The loaded tensors (already on ``target``) are assigned as the parameters: random
        # initialisation of weights the checkpoint overwrites costs as much as loading them. A module
        # with state outside its state_dict (non-persistent buffers) or tied weights needs a real
        # build, under a forked RNG so the caller's random stream stays where it was.
        outside = [n for n, _ in (*model.named_parameters(), *model.named_buffers()) if n not in state]
        tied = len(list(model.named_parameters(remove_duplicate=False))) != len(list(model.parameters()))
        if outside or tied:
            with torch.random.fork_rng(devices=[]):
                model = _call(self.builder, self.args, self.shown)
            model.to(target)
            load_model_state(model, state, source=source)
        else:
            load_model_state(model, state, source=source, assign=True)
        if self.memory_format == "channels_last":
            model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        return model


def _short(args: Any) -> str:
    text = repr(args)
    return text if len(text) <= 120 else text[:117] + "..."


def plan_model(info: Mapping[str, Any], *, factory: Any = None, trust_code: bool = False) -> ModelPlan:
    """Find the recorded class or factory (never importing anything) and build it on the meta device."""
    factory_name = info.get("factory")
    args = info.get("args")
    if args is not None and not isinstance(args, dict):
        raise CheckpointError(f"manifest field 'model.args' is {args!r}, expected an object")
    if factory_name is not None:
        if not isinstance(factory_name, str):
            raise CheckpointError(f"manifest field 'model.factory' is {factory_name!r}, expected 'module:fn'")
        builder: Any = trusted_factory(factory_name, factory, trust_code=trust_code)
        shown = factory_name
    else:
        builder = resolve(info.get("class"), "model.class")
        if not (isinstance(builder, type) and issubclass(builder, torch.nn.Module)):
            raise CheckpointError(
                f"manifest field 'model.class' names {info.get('class')!r}, which is not a torch.nn.Module "
                "subclass; refused"
            )
        shown = str(info.get("class"))
    if args is None and factory_name is None:
        required = _required(builder)
        if required:
            raise ConfigError(
                f"model=None, but {shown} needs arguments {required} that were not recorded; pass model= "
                "an instance, or record model_args={...} (or model_factory=) in track() so restore can "
                "rebuild it"
            )
    args = dict(args or {})
    try:
        inspect.signature(builder).bind(**args)
    except TypeError as e:
        raise ConfigError(
            f"model=None, but {shown} cannot be called with the recorded model_args {_short(args)} ({e}); "
            "pass model= an instance, or record model_args={...} (or model_factory=) in track()"
        ) from e
    except ValueError:
        pass  # no signature to check (a builtin): the call below says what is wrong
    with torch.device("meta"):
        meta = _call(builder, args, shown)
    fmt = info.get("memory_format")
    return ModelPlan(builder, args, shown, meta, fmt if isinstance(fmt, str) else None)


def _required(cls: Any) -> list[str]:
    try:
        params = list(inspect.signature(cls).parameters.values())
    except (TypeError, ValueError):
        return []
    return [
        p.name
        for p in params
        if p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]


def _call(builder: Any, args: dict[str, Any], shown: str) -> torch.nn.Module:
    try:
        model = builder(**args)
    except Exception as e:
        raise ConfigError(
            f"model=None, but {shown}(**{args!r}) raised {type(e).__name__}: {e}; pass model= an instance"
        ) from e
    if not isinstance(model, torch.nn.Module):
        raise CheckpointError(f"{shown} returned a {type(model).__name__}, not a torch.nn.Module; refused")
    return model


def state_mismatch(state: Mapping[str, Any], expected: Mapping[str, Any]) -> str:
    """Missing, unexpected and mis-shaped keys of ``state`` against ``expected``; "" when they fit."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(state)
        if isinstance(state[k], torch.Tensor)
        and isinstance(expected[k], torch.Tensor)
        and state[k].shape != expected[k].shape
    )
    parts = []
    if missing:
        parts.append(f"missing keys {missing[:10]}")
    if unexpected:
        parts.append(f"unexpected keys {unexpected[:10]}")
    if shapes:
        parts.append(f"mis-shaped keys {shapes[:10]}")
    return "; ".join(parts)


def load_model_state(
    model: torch.nn.Module, state: Mapping[str, Any], source: str, *, assign: bool = False
) -> None:
    """``load_state_dict(strict=True)`` with an error listing missing, unexpected and mis-shaped keys."""
    mismatch = state_mismatch(state, model.state_dict())
    if mismatch:
        raise ArchitectureMismatchError(
            f"{source} does not fit {type(model).__name__}: {mismatch}. Build the model with the same "
            "architecture and arguments as in training (see manifest 'model.args')"
        )
    model.load_state_dict(state, strict=True, assign=assign)


def rebuild_optimizer(
    info: Mapping[str, Any], model: torch.nn.Module, saved: Mapping[str, Any]
) -> torch.optim.Optimizer:
    """The recorded optimizer class over the same parameter groups, with ``saved`` state loaded."""
    shown = info.get("class")
    cls = resolve(shown, "optimizer.class")
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise CheckpointError(
            f"manifest field 'optimizer.class' names {shown!r}, which is not a torch.optim.Optimizer "
            "subclass; refused"
        )
    fix = (
        "pass optimizer= an instance built as in training to restore its state, or use "
        "mlflow_best.load_model(ref) for the weights alone"
    )
    named = dict(model.named_parameters())
    groups = info.get("groups")
    if groups is None:  # written before parameter groups were recorded: one group, every parameter
        n_saved = len(saved.get("param_groups", []))
        if n_saved != 1:
            raise CheckpointError(
                f"the optimizer {shown} was saved with {n_saved} parameter groups, which this checkpoint's "
                f"manifest does not describe; {fix}"
            )
        param_groups: list[dict[str, Any]] = [{"params": list(model.parameters())}]
    else:
        param_groups = []
        for i, group in enumerate(groups):
            names = group.get("params") if isinstance(group, Mapping) else None
            if not isinstance(names, list) or any(n not in named for n in names):
                unknown = [n for n in names or [] if n not in named] if isinstance(names, list) else names
                raise CheckpointError(
                    f"the optimizer {shown}'s parameter group {i} holds parameters that are not the rebuilt "
                    f"model's (unknown: {str(unknown)[:200]}); {fix}"
                )
            param_groups.append({"params": [named[n] for n in names]})
    accepted = _accepted(cls)
    defaults = {k: v for k, v in (info.get("defaults") or {}).items() if accepted is None or k in accepted}
    try:
        opt: torch.optim.Optimizer = cls(param_groups, **defaults)
        opt.load_state_dict(dict(saved))
    except Exception as e:
        raise CheckpointError(
            f"the optimizer {shown} cannot be rebuilt from the checkpoint ({type(e).__name__}: {e}); {fix}"
        ) from e
    return opt


def _accepted(cls: type) -> set[str] | None:
    try:
        params = inspect.signature(cls.__init__).parameters  # type: ignore[misc]
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return None
    return set(params)


def load_optimizer_state(opt: torch.optim.Optimizer, saved: Mapping[str, Any], source: str) -> None:
    """``opt.load_state_dict`` with an error that says what differs instead of torch's bare one."""
    groups = saved.get("param_groups", [])
    ours = opt.param_groups
    if len(groups) != len(ours) or any(
        len(g.get("params", [])) != len(o["params"]) for g, o in zip(groups, ours, strict=False)
    ):
        raise ArchitectureMismatchError(
            f"{source}: the saved optimizer has {len(groups)} parameter group(s) of sizes "
            f"{[len(g.get('params', [])) for g in groups]}, the optimizer given has {len(ours)} of sizes "
            f"{[len(o['params']) for o in ours]}; build it with the same parameter groups as in training, or "
            "pass optimizer=None to rebuild it from the checkpoint"
        )
    opt.load_state_dict(dict(saved))
