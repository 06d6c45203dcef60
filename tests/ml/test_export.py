"""ONNX export: one graph from raw columns to probability, equal to the torch recipe on
the agreed preprocessing, for every recipe; weights as content-addressed external files."""

from __future__ import annotations

import hashlib

import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest

from consortia.ml.data import transform
from consortia.ml.export import export_onnx, externalize, sample_inputs
from consortia.ml.recipes import init_params, predict
from consortia.protocol.schemas import PreprocessingPlan


def feeds(frame: pd.DataFrame, plan: PreprocessingPlan) -> dict[str, np.ndarray]:
    out = {}
    for name in plan.feature_order:
        if name in plan.numeric:
            out[name] = pd.to_numeric(frame[name], errors="coerce").to_numpy(np.float64).reshape(-1, 1)
        else:
            out[name] = frame[name].astype("string").fillna("<missing>").to_numpy(object).reshape(-1, 1)
    return out


def run(model, tmp_path, frame, plan):
    graph, tensors = externalize(model, tmp_path)
    (tmp_path / "model.onnx").write_bytes(graph)
    sess = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    return sess.run(["probability"], feeds(frame, plan))[0], tensors


@pytest.mark.parametrize("recipe,options", [("logistic_regression", {}), ("mlp", {"hidden": [16, 8]})])
def test_tabular_graph_matches_torch_on_real_rows_with_missing_and_unknown_values(recipe, options, tmp_path):
    from consortia.datasets.scenarios import load_scenario

    sc = load_scenario("finance", 1, 1)
    frame = next(iter(sc.partitions.values())).head(400).copy()
    frame.loc[frame.index[:5], "annual_inc"] = np.nan  # missing numeric -> mean
    frame.loc[frame.index[5:10], "term"] = None  # missing categorical
    frame.loc[frame.index[10:15], "sub_grade"] = "Z9"  # never seen in training
    numeric = [f["name"] for f in sc.spec["features"] if f["type"] == "numeric"]
    categorical = [f["name"] for f in sc.spec["features"] if f["type"] == "categorical"]
    plan = PreprocessingPlan(
        numeric={c: (float(frame[c].mean()), float(frame[c].std() or 1.0)) for c in numeric},
        categorical={c: sorted(frame[c].dropna().astype(str).unique().tolist()) for c in categorical},
        feature_order=numeric + categorical,
    )
    params = init_params(recipe, plan.input_dim, options, seed=3)
    got, tensors = run(export_onnx(recipe, options, params, plan), tmp_path, frame, plan)
    want = predict(recipe, options, params, transform(frame, plan))
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert len(tensors) == len(params)
    for t in tensors.values():
        data = (tmp_path / t["path"]).read_bytes()
        assert len(data) == t["size"] and hashlib.sha256(data).hexdigest() == t["sha256"]


def test_cnn_graph_matches_torch(tmp_path):
    rng = np.random.default_rng(0)
    cols = [f"p{i}" for i in range(784)]
    frame = pd.DataFrame(rng.random((20, 784)), columns=cols)
    plan = PreprocessingPlan(numeric={c: (0.5, 0.3) for c in cols}, categorical={}, feature_order=cols)
    params = init_params("cnn", 784, {"channels": 4}, seed=0)
    got, _ = run(export_onnx("cnn", {"channels": 4}, params, plan), tmp_path, frame, plan)
    np.testing.assert_allclose(got, predict("cnn", {"channels": 4}, params, transform(frame, plan)), atol=1e-5)


def test_sample_inputs_cover_spread_missing_and_unknown():
    plan = PreprocessingPlan(numeric={"x": (10.0, 2.0)}, categorical={"c": ["a", "b"]}, feature_order=["x", "c"])
    s = sample_inputs(plan, [{"name": "x", "type": "numeric"}, {"name": "c", "type": "categorical"}])
    assert s == {"x": [8.0, 10.0, 12.0, None], "c": ["a", "b", "<not-in-vocabulary>", None]}


def test_graph_is_shared_by_releases_of_one_architecture(tmp_path):
    """Tensor locations never depend on values: a retrain (or an adapter) changes tensor
    files only, so a device holding the base downloads no new graph."""
    plan = PreprocessingPlan(numeric={"x": (0.0, 1.0)}, categorical={"c": ["a", "b"]}, feature_order=["x", "c"])
    graphs, shas = [], []
    for seed in (1, 2):
        params = init_params("mlp", plan.input_dim, {"hidden": [4]}, seed=seed)
        graph, tensors = externalize(export_onnx("mlp", {"hidden": [4]}, params, plan), tmp_path / str(seed))
        graphs.append(graph)
        shas.append({t["sha256"] for t in tensors.values()})
    assert graphs[0] == graphs[1]
    assert not shas[0] & shas[1]
