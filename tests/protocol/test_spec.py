import pytest

from consortia.coordinator.services.rounds import parse_spec
from consortia.errors import SpecError

BASE = {
    "name": "job",
    "recipe": {"name": "logistic_regression"},
    "features": [{"name": "x", "type": "numeric"}, {"name": "c", "type": "categorical", "vocabulary": "agreed"}],
    "label": {"column": "y", "positive": "1"},
    "rounds": 3,
}


def spec(**kw):
    return {**BASE, **kw}


def test_valid_spec_gets_defaults():
    s = parse_spec(spec())
    assert s.min_sites == 2 and s.strategy.name == "fedavg" and s.split == (0.7, 0.15, 0.15)


@pytest.mark.parametrize(
    "raw, field",
    [
        (spec(rounds=0), "rounds"),
        (spec(recipe={"name": "xgboost"}), "recipe.name"),
        (spec(fraction=1.5), "fraction"),
        (spec(features=[]), "features"),
        (spec(label={"column": "x", "positive": "1"}), "label.column"),
        (spec(features=[{"name": "x", "type": "numeric", "vocabulary": ["a"]}]), "numeric"),
        (spec(learning_rate=-1), "learning_rate"),
        (spec(split=[0.5, 0.5, 0.5]), "split"),
        (spec(unknown_field=1), "unknown_field"),
        (spec(recipe={"name": "mlp", "options": {"hidden": "big"}}), "recipe.options.hidden"),
        (spec(recipe={"name": "mlp", "options": {"layers": 3}}), "recipe.options"),
        (spec(strategy={"name": "fedadam", "options": {"eta": -1}}), "strategy.options"),
        ([1, 2], "mapping"),
    ],
)
def test_bad_specs_name_the_field(raw, field):
    with pytest.raises(SpecError) as exc:
        parse_spec(raw)
    assert field in exc.value.message
