"""Built-in model recipes: logistic regression, MLP and a small CNN (torch).

A recipe builds a torch module from the agreed input dimension and its options;
parameters travel as named float32 arrays (the module's ``state_dict``). Training uses
plain minibatch SGD on the binary cross-entropy, plus FedProx's proximal term
``mu/2 * ||w - w_global||^2`` when ``proximal_mu > 0`` (Li et al. 2020).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from consortia.core.params import Params
from consortia.errors import SpecError

__all__ = [
    "RECIPES",
    "TrainResult",
    "build",
    "init_params",
    "predict",
    "resolve_adapter",
    "train",
    "validate_recipe",
]

RECIPES = ("logistic_regression", "mlp", "cnn")


def validate_recipe(name: str, options: Mapping[str, Any], input_dim: int | None = None) -> None:
    """Raise :class:`SpecError` naming the bad option."""
    if name not in RECIPES:
        raise SpecError(f"recipe.name: unknown recipe {name!r}; choose one of {list(RECIPES)}.")
    allowed = {"logistic_regression": set(), "mlp": {"hidden", "dropout"}, "cnn": {"channels"}}[name]
    extra = sorted(set(options) - allowed)
    if extra:
        raise SpecError(f"recipe.options: unknown option(s) {extra} for {name}; allowed {sorted(allowed)}.")
    if name == "mlp":
        hidden = options.get("hidden", [32])
        if not (isinstance(hidden, list) and hidden and all(isinstance(h, int) and 0 < h <= 4096 for h in hidden)):
            raise SpecError("recipe.options.hidden: a non-empty list of layer sizes in 1..4096.")
        dropout = options.get("dropout", 0.0)
        if not isinstance(dropout, int | float) or not 0 <= dropout < 1:
            raise SpecError(f"recipe.options.dropout == {dropout!r}, must be in [0, 1).")
    if name == "cnn":
        ch = options.get("channels", 8)
        if not isinstance(ch, int) or not 1 <= ch <= 256:
            raise SpecError(f"recipe.options.channels == {ch!r}, must be an integer in 1..256.")
        if input_dim is not None and input_dim != 784:
            raise SpecError(f"recipe cnn expects 784 inputs (28x28 pixels), the schema gives {input_dim}.")


def build(name: str, input_dim: int, options: Mapping[str, Any]):  # type: ignore[no-untyped-def]
    """The torch module for a recipe (outputs one logit per row)."""
    import torch
    from torch import nn

    validate_recipe(name, options, input_dim)
    if name == "logistic_regression":
        return nn.Sequential(nn.Linear(input_dim, 1))
    if name == "mlp":
        layers: list[nn.Module] = []
        prev = input_dim
        for h in options.get("hidden", [32]):
            layers += [nn.Linear(prev, h), nn.ReLU()]
            if options.get("dropout", 0.0):
                layers.append(nn.Dropout(float(options["dropout"])))
            prev = h
        layers.append(nn.Linear(prev, 1))
        return nn.Sequential(*layers)
    ch = int(options.get("channels", 8))

    class _Reshape(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.view(-1, 1, 28, 28)

    return nn.Sequential(
        _Reshape(),
        nn.Conv2d(1, ch, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(ch, 2 * ch, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * ch * 7 * 7, 32),
        nn.ReLU(),
        nn.Linear(32, 1),
    )


def _to_params(module) -> Params:  # type: ignore[no-untyped-def]
    return {k: v.detach().cpu().numpy().astype(np.float32).copy() for k, v in module.state_dict().items()}


def _load(module, params: Mapping[str, np.ndarray]) -> None:  # type: ignore[no-untyped-def]
    import torch

    module.load_state_dict({k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in params.items()})


def init_params(name: str, input_dim: int, options: Mapping[str, Any], seed: int) -> Params:
    """Seeded initial parameters (identical for identical arguments)."""
    import torch

    torch.manual_seed(seed)
    return _to_params(build(name, input_dim, options))


def _module_order(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key putting ``10.weight`` after ``2.weight`` (module order, not text order)."""
    return tuple((0, int(x)) if x.isdigit() else (1, x) for x in name.split("."))


def resolve_adapter(params: Mapping[str, np.ndarray], patterns: list[str]) -> list[str]:
    """The explicit parameter names an adapter declaration selects: exact names, fnmatch
    patterns (``4.*``) or ``@last`` (every tensor of the final layer). Raises
    :class:`SpecError` when a pattern selects nothing or the selection is the whole
    model (that is a retrain, not an adapter)."""
    import fnmatch

    names = sorted(params, key=_module_order)
    chosen: list[str] = []
    for pat in patterns:
        if pat == "@last":
            layer = names[-1].rsplit(".", 1)[0]
            hit = [n for n in names if n.rsplit(".", 1)[0] == layer]
        else:
            hit = [n for n in names if fnmatch.fnmatchcase(n, pat)]
        if not hit:
            raise SpecError(f"adapter parameter {pat!r} matches no parameter of the base; it has {names}.")
        chosen += [n for n in hit if n not in chosen]
    if len(chosen) == len(names):
        raise SpecError(
            f"the adapter {patterns} selects every parameter of the base: that is a retrain; "
            "declare a subset (e.g. '@last') or submit a federated job."
        )
    return [n for n in names if n in chosen]


@dataclass(frozen=True)
class TrainResult:
    params: Params
    loss: float
    num_examples: int


def train(
    name: str,
    options: Mapping[str, Any],
    params: Mapping[str, np.ndarray],
    X: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    proximal_mu: float = 0.0,
    trainable: Collection[str] | None = None,
) -> TrainResult:
    """Local SGD from ``params``; returns the new parameters and the mean training loss.
    With ``trainable`` only those parameters move (an adapter); the rest stay frozen."""
    import torch

    if len(X) == 0:
        raise SpecError("no training rows at this site after filtering; cannot train.")
    gen = torch.Generator().manual_seed(seed)
    model = build(name, X.shape[1], options)
    _load(model, params)
    if trainable is not None:
        unknown = sorted(set(trainable) - set(params))
        if unknown:
            raise SpecError(f"adapter parameter(s) {unknown} are not parameters of this model.")
        for pname, p in model.named_parameters():
            p.requires_grad_(pname in trainable)
    anchor = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else None
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y.astype(np.float32))
    model.train()
    total, count = 0.0, 0
    for _ in range(epochs):
        perm = torch.randperm(len(Xt), generator=gen)
        for start in range(0, len(Xt), batch_size):
            idx = perm[start : start + batch_size]
            opt.zero_grad()
            loss = loss_fn(model(Xt[idx]).squeeze(-1), yt[idx])
            total += float(loss.detach()) * len(idx)
            count += len(idx)
            if anchor is not None:
                prox = sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor, strict=True))
                loss = loss + 0.5 * proximal_mu * prox
            loss.backward()
            opt.step()
    return TrainResult(_to_params(model), total / max(count, 1), len(X))


def predict(name: str, options: Mapping[str, Any], params: Mapping[str, np.ndarray], X: np.ndarray) -> np.ndarray:
    """Positive-class probabilities (float64)."""
    import torch

    model = build(name, X.shape[1], options)
    _load(model, params)
    model.eval()
    with torch.no_grad():
        out = []
        for start in range(0, len(X), 8192):
            out.append(torch.sigmoid(model(torch.from_numpy(X[start : start + 8192])).squeeze(-1)))
        return torch.cat(out).double().numpy() if out else np.zeros(0)
