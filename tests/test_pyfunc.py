"""Issue 9: every registered version is a first-class MLflow model (pyfunc, model info, serving, UI link)."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

import mlflow_best
from mlflow_best._checkpoint import write_checkpoint
from mlflow_best._registry import link_version
from tests._server import free_port
from tests.helpers import PairNet, TinyNet, run_sequence, unique
from tests.test_device import saved_as_cuda  # noqa: F401 - the fixture, used by name below

VALUES = [1.0, 0.5, 0.7, 0.2]  # improvements (so versions) at epochs 0, 1, 3
X = np.random.default_rng(0).random((5, 4), dtype=np.float32)
BIN = Path(sys.executable).parent


def _expected(state: dict[str, torch.Tensor], x: np.ndarray, hidden: int = 8) -> np.ndarray:
    net = TinyNet(hidden)
    net.load_state_dict(state)
    with torch.no_grad():
        out: np.ndarray = net.eval()(torch.from_numpy(x)).numpy()
    return out


def _versions(client: MlflowClient, name: str) -> list[Any]:
    return sorted(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))


def _model_id(v: Any) -> str:
    return str(v.model_id or v.tags["mlflow_best.model_id"])


# -- pyfunc, every reference form -------------------------------------------------------------------
def test_every_version_loads_with_pyfunc_by_each_reference_and_predicts_its_epoch(store: str) -> None:
    name = unique("pyf")
    snaps: dict[int, dict[str, torch.Tensor]] = {}
    run_sequence(VALUES, snapshots=snaps, experiment=unique("e"), registered_model=name)
    client = MlflowClient(store)
    versions = _versions(client, name)
    assert [int(v.tags["epoch"]) for v in versions] == [0, 1, 3]
    for v in versions:
        epoch = int(v.tags["epoch"])
        client.set_registered_model_alias(name, f"epoch{epoch}", v.version)
        refs = [f"models:/{name}/{v.version}", f"models:/{name}@epoch{epoch}", f"models:/{_model_id(v)}"]
        if epoch == 3:
            refs.append(f"models:/{name}@best")
        expected = _expected(snaps[epoch], X)
        for ref in refs:
            model = mlflow.pyfunc.load_model(ref)
            np.testing.assert_array_equal(model.predict(X), expected, err_msg=ref)
            # float64 input (what JSON gives without a signature) runs at the weights' float32
            np.testing.assert_array_equal(model.predict(X.astype(np.float64)), expected, err_msg=ref)
            frame = pd.DataFrame(X.astype(np.float64))
            np.testing.assert_array_equal(model.predict(frame), expected, err_msg=ref)
            assert model.get_raw_model().training is False


def test_model_info_shows_the_pyfunc_flavor_and_the_signature_of_the_input_example(store: str) -> None:
    name = unique("info")
    run_sequence([1.0, 0.5], experiment=unique("e"), registered_model=name, input_example=X[:2])
    for ref in (f"models:/{name}/1", f"models:/{name}@best"):
        info = mlflow.models.get_model_info(ref)
        assert info.flavors["python_function"]["loader_module"] == "mlflow_best._pyfunc"
        assert info.flavors["mlflow_best"]["format_version"] == 1
        assert info.flavors["mlflow_best"]["model_class"] == "tests.helpers:TinyNet"
        assert info.signature is not None
        assert info.signature.inputs.to_dict() == [
            {"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": (-1, 4)}}
        ]
        assert info.signature.outputs.to_dict() == [
            {"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": (-1, 2)}}
        ]
    # Without an example there is nothing to infer from: the model still loads, without a schema.
    other = unique("nosig")
    run_sequence([1.0], experiment=unique("e"), registered_model=other)
    assert mlflow.models.get_model_info(f"models:/{other}/1").signature is None


def test_each_version_records_pinned_requirements_so_no_inference_runs(store: str) -> None:
    name = unique("req")
    run_sequence([1.0], experiment=unique("e"), registered_model=name)
    reqs = mlflow.pyfunc.get_model_dependencies(f"models:/{name}/1")
    lines = Path(reqs).read_text().split()
    assert lines == [
        f"torch=={torch.__version__.split('+')[0]}",
        f"mlflow=={mlflow.__version__}",
        f"mlflow-best=={mlflow_best.__version__}",
    ]


def test_dict_inputs_and_outputs(sqlite_uri: str) -> None:
    name = unique("pair")
    model = PairNet()
    example = {"a": X[:2], "b": X[2:4]}
    with mlflow_best.track(model, None, registered_model=name, input_example=example) as run:
        run.log_epoch(0, {"val_loss": 1.0})
    pyf = mlflow.pyfunc.load_model(f"models:/{name}@best")
    got = pyf.predict({"a": X, "b": X[::-1].copy()})
    with torch.no_grad():
        want = model.eval()(torch.from_numpy(X), torch.from_numpy(X[::-1].copy()))
    assert set(got) == {"sum", "diff"}
    for key in got:
        np.testing.assert_array_equal(got[key], want[key].numpy())
    inputs = mlflow.models.get_model_info(f"models:/{name}/1").signature.inputs
    assert inputs.input_names() == ["a", "b"]


# -- the link the UI reads --------------------------------------------------------------------------
def test_each_logged_model_lists_its_version_in_the_model_versions_tag(store: str) -> None:
    name = unique("link")
    run_sequence(VALUES, experiment=unique("e"), registered_model=name)
    client = MlflowClient(store)
    for v in _versions(client, name):
        tag = client.get_logged_model(_model_id(v)).tags["mlflow.modelVersions"]
        assert [{**e, "version": str(e["version"])} for e in json.loads(tag)] == [
            {"name": name, "version": str(v.version)}
        ]
        # A retry (the answer to the first call lost) does not list the version twice.
        link_version(client, _model_id(v), name, str(v.version))
        assert len(json.loads(client.get_logged_model(_model_id(v)).tags["mlflow.modelVersions"])) == 1


# -- what the loader refuses ------------------------------------------------------------------------
def test_a_tampered_weight_file_is_refused_by_the_pyfunc_loader(store: str, tmp_path: Path) -> None:
    name = unique("tamper")
    run_sequence([1.0, 0.5], experiment=unique("e"), registered_model=name)
    client = MlflowClient(store)
    model_id = _model_id(client.get_model_version_by_alias(name, "best"))
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{model_id}", dst_path=str(tmp_path / "dl")))
    data = bytearray((local / "model.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the checksum can tell
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "model.pt").write_bytes(bytes(data))
    client.log_model_artifacts(model_id, str(evil))  # replaces model.pt in the artifact store
    with pytest.raises(mlflow_best.CheckpointError, match=r"model\.pt fails its checksum"):
        mlflow.pyfunc.load_model(f"models:/{name}@best")
    with pytest.raises(mlflow_best.CheckpointError, match=r"model\.pt fails its checksum"):
        mlflow_best.load_model(f"models:/{name}@best")


def test_a_changed_mlmodel_or_shipped_code_is_refused(sqlite_uri: str, tmp_path: Path) -> None:
    code = tmp_path / "helper_code.py"
    code.write_text("X = 1\n")
    run, _, _ = run_sequence([1.0], registered_model=unique("m"), code_paths=[code])
    folder = mlflow_best.restore(run.run_id).path
    local = tmp_path / "copy"
    import shutil

    shutil.copytree(folder, local)
    (local / "code" / "helper_code.py").write_text("X = 2\n")
    with pytest.raises(mlflow_best.CheckpointError, match=r"code/helper_code\.py fails its checksum"):
        mlflow.pyfunc.load_model(str(local))
    shutil.rmtree(local)
    shutil.copytree(folder, local)
    with open(local / "MLmodel", "a") as f:
        f.write("# changed\n")
    with pytest.raises(mlflow_best.CheckpointError, match=r"MLmodel is \d+ bytes, the manifest says"):
        mlflow.pyfunc.load_model(str(local))


# -- device -------------------------------------------------------------------------------------------
def test_the_device_comes_from_model_config_then_mlflows_setting(
    sqlite_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = unique("dev")
    run_sequence([1.0], registered_model=name)
    uri = f"models:/{name}/1"
    monkeypatch.setenv("MLFLOW_DEFAULT_PREDICTION_DEVICE", "tpu9")
    with pytest.raises(mlflow_best.ConfigError, match="device='tpu9' is not a torch device"):
        mlflow.pyfunc.load_model(uri)
    model = mlflow.pyfunc.load_model(uri, model_config={"device": "cpu"})  # model_config wins
    assert model.predict(X).shape == (5, 2)
    monkeypatch.delenv("MLFLOW_DEFAULT_PREDICTION_DEVICE")
    with pytest.raises(mlflow_best.ConfigError, match="device='gpu' is not a torch device"):
        mlflow.pyfunc.load_model(uri, model_config={"device": "gpu"})


@pytest.mark.usefixtures("saved_as_cuda")
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks loading CUDA checkpoints where CUDA is absent")
def test_a_checkpoint_saved_on_cuda_serves_on_the_cpu(sqlite_uri: str) -> None:
    name = unique("cuda")
    snaps: dict[int, dict[str, torch.Tensor]] = {}
    run_sequence([1.0, 0.5], snapshots=snaps, registered_model=name)
    model = mlflow.pyfunc.load_model(f"models:/{name}@best")
    np.testing.assert_array_equal(model.predict(X), _expected(snaps[1], X))
    net = mlflow_best.load_model(f"models:/{name}@best")
    assert all(t.device.type == "cpu" for t in net.state_dict().values())


# -- load_model: the weights alone ----------------------------------------------------------------
def test_load_model_gives_the_weights_in_eval_mode_and_never_fetches_the_training_state(
    store: str, tmp_path: Path
) -> None:
    name = unique("lm")
    snaps: dict[int, dict[str, torch.Tensor]] = {}
    run, _, _ = run_sequence(VALUES, snapshots=snaps, experiment=unique("e"), registered_model=name)
    cache = tmp_path / "cache"
    for ref, epoch in ((run.run_id, 3), (f"models:/{name}/2", 1), (f"models:/{name}@best", 3)):
        net = mlflow_best.load_model(ref, cache_dir=cache)
        assert isinstance(net, TinyNet) and not net.training
        for k, v in net.state_dict().items():
            assert torch.equal(v, snaps[epoch][k]), (ref, k)
    assert sorted(p.name for p in cache.rglob("*") if p.is_file() and not p.name.startswith(".")) == sorted(
        ["manifest.json", "model.pt"] * 2
    )
    # A local folder without its training state: restore cannot use it, load_model can.
    folder = mlflow_best.restore(f"models:/{name}/1", cache_dir=tmp_path / "full").path
    (folder / "training_state.pt").unlink()
    with pytest.raises(mlflow_best.CheckpointError, match=r"training_state\.pt is missing"):
        mlflow_best.restore(str(folder))
    net = mlflow_best.load_model(str(folder))
    assert torch.equal(net.fc1.weight, snaps[0]["fc1.weight"])


def test_a_checkpoint_of_the_earlier_format_still_restores_and_loads(sqlite_uri: str, tmp_path: Path) -> None:
    """Written as mlflow_best 0.1.0 did: state dicts and manifest only, no MLmodel, no env files."""
    net = TinyNet()
    meta = {
        "kind": "best", "epoch": 4, "monitor": "val_loss", "mode": "min", "value": 0.25,
        "metrics": {"val_loss": 0.25}, "run_id": None,
        "model": {"class": "tests.helpers:TinyNet", "args": {"hidden": 8}}, "optimizer": None,
    }  # fmt: skip
    folder = write_checkpoint(tmp_path, "old", net.state_dict(), {"epoch": 4, "optimizer": None}, meta)
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "model.pt", "training_state.pt"]
    client = MlflowClient(sqlite_uri)
    exp = client.create_experiment(unique("old"))
    lm = client.create_logged_model(exp, name="old")
    client.log_model_artifacts(lm.model_id, str(folder))
    client.finalize_logged_model(lm.model_id, "READY")
    name = unique("oldm")
    client.create_registered_model(name)
    client.create_model_version(name, source=f"models:/{lm.model_id}", model_id=lm.model_id)
    for ref in (str(folder), f"models:/{name}/1", f"models:/{lm.model_id}"):
        restored = mlflow_best.restore(ref)
        loaded = mlflow_best.load_model(ref)
        assert restored.epoch == 4
        for k, v in net.state_dict().items():
            assert torch.equal(restored.model.state_dict()[k], v) and torch.equal(loaded.state_dict()[k], v)


# -- validated at track, before any run ------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"input_example": np.zeros((2, 3), np.float32)},
         r"input_example=<ndarray of shape \(2, 3\), dtype float32> cannot be passed to the model "
         r"\(RuntimeError: .*\); pass a batch that model\(batch\) accepts"),
        ({"input_example": [[1.0, 2.0, 3.0, 4.0]]},
         r"input_example=\[\[1\.0, .*must be a batch the model accepts"),
        ({"input_example": np.array([["a", "b", "c", "d"]])}, r"dtype <U1, expected numbers"),
        ({"code_paths": ["no_such_file.py"]},
         r"code_paths: 'no_such_file.py' does not exist \(resolved from "),
        ({"code_paths": "models.py"}, r"code_paths='models.py' must be a list of files or folders"),
    ],
)  # fmt: skip
def test_a_bad_input_example_or_code_path_is_refused_before_any_run(
    sqlite_uri: str, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(mlflow_best.ConfigError, match=message):
        mlflow_best.track(TinyNet(), None, experiment="never", **kwargs)
    assert MlflowClient(sqlite_uri).get_experiment_by_name("never") is None


class _Noisy(torch.nn.Module):
    """Draws from the global RNG in every forward, as some augmentations and noise layers do."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0 * torch.rand_like(x)


def test_the_signature_forward_leaves_modes_and_random_state_as_they_were(sqlite_uri: str) -> None:
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5), _Noisy(), torch.nn.Linear(4, 2))
    net[3].eval()  # a mix of modes, as a partly frozen model has
    before = torch.get_rng_state()
    mlflow_best.track(net, None, input_example=X)
    assert torch.equal(torch.get_rng_state(), before)
    assert [m.training for m in net.modules()] == [True, True, True, True, False]


# -- mlflow models serve ------------------------------------------------------------------------------
@contextlib.contextmanager
def _serve(uri: str, tracking_uri: str, cwd: Path) -> Iterator[str]:
    """``mlflow models serve --env-manager local`` in another folder, without our PYTHONPATH."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_RUN_ID")}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        MLFLOW_TRACKING_URI=tracking_uri,
        MLFLOW_MODELS_WORKERS="1",
    )
    cwd.mkdir(parents=True, exist_ok=True)
    log = cwd / "serve.log"
    cmd = [str(BIN / "mlflow"), "models", "serve", "-m", uri, "--env-manager", "local",
           "-h", "127.0.0.1", "-p", str(port)]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow models serve exited {proc.returncode}:\n{log.read_text()[-3000:]}")
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/ping", timeout=2) as r:
                if r.status == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow models serve did not answer /ping:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _invoke(url: str, payload: dict[str, Any]) -> Any:
    request = urllib.request.Request(
        f"{url}/invocations", data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return json.loads(r.read())["predictions"]
    except urllib.error.HTTPError as e:
        pytest.fail(f"/invocations answered {e.code}: {e.read().decode()[:2000]}")


@pytest.mark.slow
def test_mlflow_models_serve_answers_with_the_best_versions_predictions(
    sqlite_uri: str, tmp_path: Path
) -> None:
    from mlflow_best._demo import DigitsMLP

    name = unique("serve")
    torch.manual_seed(0)
    model = DigitsMLP(hidden=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = np.random.default_rng(1).random((3, 64), dtype=np.float32)
    best: dict[str, torch.Tensor] = {}
    # A new experiment: the test store's Default one keeps artifacts relative to the test's folder.
    tracked = mlflow_best.track(
        model, opt, experiment=unique("e"), registered_model=name, model_args={"hidden": 16}, input_example=x
    )
    with tracked as run:
        for epoch, value in enumerate([1.0, 0.5, 0.8]):
            model.train()
            opt.zero_grad()
            model(torch.randn(8, 64)).pow(2).mean().backward()
            opt.step()
            if run.log_epoch(epoch, {"val_loss": value}):
                best = {k: v.clone() for k, v in model.state_dict().items()}
    reference = DigitsMLP(hidden=16)
    reference.load_state_dict(best)
    with torch.no_grad():
        expected = reference.eval()(torch.from_numpy(x)).numpy()
    with _serve(f"models:/{name}@best", sqlite_uri, tmp_path / "elsewhere") as url:
        got = np.asarray(_invoke(url, {"inputs": x.tolist()}), dtype=np.float32)
        by_split = np.asarray(
            _invoke(url, {"dataframe_split": {"columns": list(range(64)), "data": x.tolist()}}),
            dtype=np.float32,
        )
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(by_split, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_a_model_class_shipped_with_code_paths_serves_where_it_is_not_installed(
    sqlite_uri: str, tmp_path: Path
) -> None:
    module_name = unique("user_net").replace("-", "_")
    source = tmp_path / "project" / f"{module_name}.py"
    source.parent.mkdir()
    source.write_text(textwrap.dedent("""
        import torch
        from torch import nn


        class UserNet(nn.Module):
            def __init__(self, width: int = 3) -> None:
                super().__init__()
                self.lin = nn.Linear(4, width)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return torch.tanh(self.lin(x)) * 2
    """))
    spec = importlib.util.spec_from_file_location(module_name, source)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
        model = module.UserNet(width=3)
        name = unique("code")
        with mlflow_best.track(
            model, None, experiment=unique("e"), registered_model=name, model_args={"width": 3},
            input_example=X[:2], code_paths=[source],
        ) as run:
            run.log_epoch(0, {"val_loss": 1.0})
        with torch.no_grad():
            expected = model.eval()(torch.from_numpy(X)).numpy()
    finally:
        del sys.modules[module_name]
    with _serve(f"models:/{name}@best", sqlite_uri, tmp_path / "serving") as url:
        got = np.asarray(_invoke(url, {"inputs": X.tolist()}), dtype=np.float32)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
