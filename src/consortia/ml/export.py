"""Export a trained recipe to one ONNX graph that takes raw columns and returns the
positive-class probability, with the agreed preprocessing inside the graph.

Inputs: one tensor per feature column, shape ``[rows, 1]``: ``double`` for numeric
columns (standardised with the agreed mean and std, missing -> 0 as in training) and
``string`` for categorical ones (one-hot over the agreed vocabulary with
``ai.onnx.ml.OneHotEncoder``; unknown values -> all zeros, missing values are the string
``"<missing>"``). Output: ``probability``, ``float[rows]``.

The model part is exported from the torch recipe with ``torch.onnx.export`` (the
TorchScript exporter: it needs no onnxscript and our recipes are plain feed-forward
modules), then the preprocessing nodes are prepended. :func:`externalize` moves every
weight tensor to its own file named by its SHA-256 (ONNX external data), so a device
that already holds a tensor never downloads it again.

Runs where torch is installed (the coordinator); devices only need onnxruntime.
"""

from __future__ import annotations

import hashlib
import io
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from consortia.ml.data import MISSING
from consortia.protocol.schemas import PreprocessingPlan

__all__ = ["OPSET", "export_onnx", "externalize", "sample_inputs"]

OPSET = 17
FEATURES = "consortia/features"


def _model_graph(
    recipe: str, options: Mapping[str, Any], params: Mapping[str, np.ndarray], input_dim: int
) -> onnx.ModelProto:
    import torch

    from consortia.ml.recipes import _load, build

    class _Probability(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(self.inner(x)).reshape(-1)

    module = build(recipe, input_dim, options)
    _load(module, params)
    wrapped = _Probability(module).eval()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter announces its deprecation
        torch.onnx.export(
            wrapped,
            (torch.zeros(2, input_dim),),
            buf,
            input_names=[FEATURES],
            output_names=["probability"],
            dynamic_axes={FEATURES: {0: "rows"}, "probability": {0: "rows"}},
            dynamo=False,
            opset_version=OPSET,
        )
    return onnx.load_from_string(buf.getvalue())


def _preprocessing(plan: PreprocessingPlan) -> tuple[list[onnx.ValueInfoProto], list[onnx.NodeProto]]:
    inputs, nodes, parts = [], [], []
    for i, name in enumerate(plan.feature_order):
        p = f"consortia/pre{i}"
        if name in plan.numeric:
            mean, std = plan.numeric[name]
            inputs.append(helper.make_tensor_value_info(name, TensorProto.DOUBLE, ["rows", 1]))
            nodes += [
                helper.make_node("Constant", [], [f"{p}/mean"], value=numpy_helper.from_array(np.array(mean))),
                helper.make_node("Constant", [], [f"{p}/std"], value=numpy_helper.from_array(np.array(std))),
                helper.make_node("Constant", [], [f"{p}/zero"], value=numpy_helper.from_array(np.array(0.0))),
                helper.make_node("Sub", [name, f"{p}/mean"], [f"{p}/centred"]),
                helper.make_node("Div", [f"{p}/centred", f"{p}/std"], [f"{p}/z"]),
                helper.make_node("IsNaN", [f"{p}/z"], [f"{p}/nan"]),
                helper.make_node("IsInf", [f"{p}/z"], [f"{p}/inf"]),
                helper.make_node("Or", [f"{p}/nan", f"{p}/inf"], [f"{p}/bad"]),
                helper.make_node("Where", [f"{p}/bad", f"{p}/zero", f"{p}/z"], [f"{p}/clean"]),
                helper.make_node("Cast", [f"{p}/clean"], [f"{p}/out"], to=TensorProto.FLOAT),
            ]
            parts.append(f"{p}/out")
        else:
            vocab = plan.categorical[name]
            inputs.append(helper.make_tensor_value_info(name, TensorProto.STRING, ["rows", 1]))
            if not vocab:
                continue  # every category was suppressed: the column contributes no feature
            nodes += [
                helper.make_node(
                    "OneHotEncoder", [name], [f"{p}/onehot"], domain="ai.onnx.ml", cats_strings=list(vocab), zeros=1
                ),
                helper.make_node(
                    "Constant",
                    [],
                    [f"{p}/shape"],
                    value=numpy_helper.from_array(np.array([-1, len(vocab)], dtype=np.int64)),
                ),
                helper.make_node("Reshape", [f"{p}/onehot", f"{p}/shape"], [f"{p}/out"]),
            ]
            parts.append(f"{p}/out")
    nodes.append(helper.make_node("Concat", parts, [FEATURES], axis=1))
    return inputs, nodes


def export_onnx(
    recipe: str, options: Mapping[str, Any], params: Mapping[str, np.ndarray], plan: PreprocessingPlan
) -> onnx.ModelProto:
    """One graph: raw columns in, probability out (see the module docstring)."""
    model = _model_graph(recipe, options, params, plan.input_dim)
    inputs, nodes = _preprocessing(plan)
    g = model.graph
    old_nodes = list(g.node)
    del g.node[:]
    g.node.extend(nodes + old_nodes)
    del g.input[:]
    g.input.extend(inputs)
    if not any(o.domain == "ai.onnx.ml" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("ai.onnx.ml", 3))
    model.producer_name = "consortia"
    onnx.checker.check_model(model)
    return model


def externalize(model: onnx.ModelProto, directory: Path) -> tuple[bytes, dict[str, dict[str, Any]]]:
    """Move each initializer's bytes to ``directory/tensors/<index>_<name>.bin``; returns
    the graph bytes (weights referenced, not included) and ``{tensor name: {path, sha256,
    size}}``. Locations depend on the tensor's place and name only, never on its values,
    so two releases of one architecture share the graph byte for byte and differ only in
    the tensors that changed (a device holding the base downloads just an adapter)."""
    (directory / "tensors").mkdir(parents=True, exist_ok=True)
    tensors: dict[str, dict[str, Any]] = {}
    for i, t in enumerate(model.graph.initializer):
        data = numpy_helper.to_array(t).tobytes() if not t.raw_data else t.raw_data
        rel = f"tensors/{i:03d}_{re.sub(r'[^A-Za-z0-9._-]', '_', t.name)[:80]}.bin"
        (directory / rel).write_bytes(data)
        if not t.raw_data:  # normalise typed fields to raw bytes before externalising
            arr = numpy_helper.to_array(t)
            t.CopyFrom(numpy_helper.from_array(arr, t.name))
        onnx.external_data_helper.set_external_data(t, location=rel, offset=0, length=len(data))
        t.ClearField("raw_data")
        t.data_location = TensorProto.EXTERNAL
        tensors[t.name] = {"path": rel, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    return model.SerializeToString(), tensors


def sample_inputs(plan: PreprocessingPlan, features: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Synthetic smoke-test rows built from the agreed plan only (the coordinator holds no
    data): for numeric columns mean - std, mean, mean + std, missing; for categorical
    columns vocabulary values, a value outside it and missing."""
    out: dict[str, list[Any]] = {}
    for f in features:
        name = f["name"]
        if name in plan.numeric:
            mean, std = plan.numeric[name]
            out[name] = [mean - std, mean, mean + std, None]
        else:
            vocab = plan.categorical.get(name, [])
            values = [v for v in vocab[:2] if v != MISSING]
            out[name] = (values + ["<not-in-vocabulary>", None] + [vocab[0] if vocab else None] * 4)[:4]
    return out
