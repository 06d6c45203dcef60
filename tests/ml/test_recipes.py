import numpy as np
import pytest

from consortia.errors import SpecError
from consortia.ml import recipes


def _data(n, d, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)).astype(np.float32)
    y = (X[:, 0] + 0.5 * X[:, 1] > 0).astype(np.float32)
    return X, y


@pytest.mark.parametrize(
    "name, options, d", [("logistic_regression", {}, 4), ("mlp", {"hidden": [8, 4]}, 4), ("cnn", {"channels": 2}, 784)]
)
def test_recipes_learn_and_exchange_float32_named_arrays(name, options, d):
    X, y = _data(256, d)
    p0 = recipes.init_params(name, d, options, seed=3)
    assert all(v.dtype == np.float32 for v in p0.values())
    again = recipes.init_params(name, d, options, seed=3)
    assert all(np.array_equal(p0[k], again[k]) for k in p0)  # seeded
    first = recipes.train(name, options, p0, X, y, epochs=1, batch_size=32, lr=0.1, seed=0)
    later = recipes.train(name, options, first.params, X, y, epochs=5, batch_size=32, lr=0.1, seed=0)
    assert later.loss < first.loss
    scores = recipes.predict(name, options, later.params, X)
    assert scores.shape == (256,) and np.all((scores >= 0) & (scores <= 1))


def test_fedprox_term_keeps_weights_near_the_global_model():
    X, y = _data(256, 4)
    p0 = recipes.init_params("logistic_regression", 4, {}, seed=0)
    free = recipes.train("logistic_regression", {}, p0, X, y, epochs=5, batch_size=16, lr=0.5, seed=0)
    prox = recipes.train("logistic_regression", {}, p0, X, y, epochs=5, batch_size=16, lr=0.5, seed=0, proximal_mu=1.0)
    dist = lambda p: sum(float(np.sum((p[k] - p0[k]) ** 2)) for k in p0)  # noqa: E731
    assert dist(prox.params) < dist(free.params)


def test_bad_recipe_options_name_the_option():
    with pytest.raises(SpecError, match="784"):
        recipes.validate_recipe("cnn", {}, input_dim=10)
    with pytest.raises(SpecError, match="hidden"):
        recipes.validate_recipe("mlp", {"hidden": [0]})
