"""In-process simulated sites on scikit-learn's digits: the poisoning bar's fixture.

Twenty sites each hold a share of the 8x8 digits (IID, or non-IID by a Dirichlet draw
over labels), train a softmax regression locally (one epoch of minibatch SGD) and send
their delta from the global model. The first ``f`` sites are Byzantine and replace their
delta by an attack:

- ``sign_flip``: ``-4 x`` their honest delta;
- ``scaling``: a model trained on flipped labels (``9 - y``), its delta boosted ``n x``
  (explicit boosting, Bhagoji et al. 2019);
- ``ipm``: inner-product manipulation, ``-eps x`` the mean of the honest deltas (Xie et
  al. 2020; the attackers see every honest update, the strongest case).

The aggregation rule under test is applied to the deltas exactly as the coordinator does
(:func:`consortia.core.robust.make_rule`); ``rule=None`` is plain FedAvg.
"""

from __future__ import annotations

import numpy as np
from sklearn.datasets import load_digits

N_SITES = 20
N_BYZANTINE = 4


def _data(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    X, y = load_digits(return_X_y=True)
    X = np.hstack([X / 16.0, np.ones((len(y), 1))])  # bias column
    idx = np.random.default_rng(seed).permutation(len(y))
    cut = int(0.75 * len(y))
    return X[idx[:cut]], y[idx[:cut]], X[idx[cut:]], y[idx[cut:]]


def _partition(y: np.ndarray, n: int, alpha: float | None, rng: np.random.Generator) -> list[np.ndarray]:
    if alpha is None:
        return np.array_split(rng.permutation(len(y)), n)
    parts: list[list[int]] = [[] for _ in range(n)]
    for c in range(10):
        ids = rng.permutation(np.flatnonzero(y == c))
        cuts = (np.cumsum(rng.dirichlet([alpha] * n)) * len(ids)).astype(int)[:-1]
        for k, chunk in enumerate(np.split(ids, cuts)):
            parts[k].extend(chunk.tolist())
    return [np.array(p, int) for p in parts]


def _local(W: np.ndarray, X: np.ndarray, y: np.ndarray, rng: np.random.Generator, lr: float = 0.5) -> np.ndarray:
    W = W.copy()
    order = rng.permutation(len(y))
    for s in range(0, len(y), 16):
        b = order[s : s + 16]
        z = X[b] @ W
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        p[np.arange(len(b)), y[b]] -= 1.0
        W -= lr * X[b].T @ p / len(b)
    return W


def accuracy(
    rule,
    attack: str | None = None,
    *,
    alpha: float | None = None,
    eps: float = 100.0,
    rounds: int = 40,
    seed: int = 0,
    n: int = N_SITES,
    f: int = N_BYZANTINE,
) -> float:
    """Test accuracy of the global model after ``rounds`` rounds under ``attack``."""
    Xtr, ytr, Xte, yte = _data(seed)
    rng = np.random.default_rng(seed)
    parts = _partition(ytr, n, alpha, rng)
    W = np.zeros((Xtr.shape[1], 10))
    for _ in range(rounds):
        deltas = np.zeros((n, W.size))
        weights = np.ones(n)
        for k, part in enumerate(parts):
            if len(part):
                deltas[k] = (_local(W, Xtr[part], ytr[part], rng) - W).ravel()
                weights[k] = len(part)
        if attack == "scaling":
            for k in range(f):
                deltas[k] = n * (_local(W, Xtr[parts[k]], 9 - ytr[parts[k]], rng) - W).ravel()
        elif attack == "sign_flip":
            deltas[:f] *= -4.0
        elif attack == "ipm":
            deltas[:f] = -eps * deltas[f:].mean(axis=0)
        elif attack is not None:
            raise ValueError(attack)
        if rule is None:
            delta = (deltas * weights[:, None]).sum(axis=0) / weights.sum()
        else:
            delta = rule.combine(deltas, weights).delta
        W = W + delta.reshape(W.shape)
    return float(np.mean(np.argmax(Xte @ W, axis=1) == yte))
