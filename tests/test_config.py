import pytest

from privfl.config import (
    Scenario,
    ScenarioError,
    apply_overrides,
    load_scenario,
    resolve_scenario_path,
    scenario_dir,
)


def test_shipped_scenarios_all_validate():
    paths = sorted(scenario_dir().glob("*.toml"))
    assert any(p.stem == "three_hospitals" for p in paths)
    for path in paths:
        sc = load_scenario(path)
        assert sc.scenario.description, f"{path.name} needs a one-line description"


def test_roundtrip_json():
    sc = load_scenario(resolve_scenario_path("three_hospitals"))
    assert Scenario.from_json(sc.to_json()) == sc


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"data": {"parties": 0}}, "data.parties"),
        ({"data": {"partiez": 3}}, "data.partiez"),
        ({"data": {"parties": "three"}}, "data.parties"),
        ({"data": {"partition": "zipf"}}, "data.partition"),
        ({"data": {"dataset": "imagenet"}}, "data.dataset"),
        ({"data": {"dataset": "my loader:load"}}, "data.dataset"),
        ({"model": {"name": "models:"}}, "model.name"),
        ({"data": {"dataset": "emnist-klingon"}}, "data.dataset"),
        ({"training": {"lr": -1.0}}, "training.lr"),
        ({"training": {"batch_size": 64}, "data": {"samples_per_party": 8}}, "training.batch_size"),
        ({"scenario": {"rounds": 0}}, "scenario.rounds"),
        ({"scenario": {"device": "tpu"}}, "scenario.device"),
        ({"model": {"name": "resnet"}}, "model.name"),
        ({"defense": {"secure_aggregation": "magic"}}, "defense.secure_aggregation"),
        ({"defense": {"dp": {"mode": "client"}}}, "defense.dp.epsilon"),
        ({"defense": {"dp": {"mode": "distributed", "epsilon": 1.0}}}, "defense.dp.mode"),
        ({"attack": {"kind": "sql-injection"}}, "attack.kind"),
        (
            {"attack": {"kind": "gradient-inversion", "gradient_inversion": {"target_party": 5}}},
            "attack.gradient_inversion.target_party",
        ),
        ({"unknown_section": {}}, "unknown_section"),
        ({"data": 3}, "data"),
    ],
)
def test_invalid_values_name_the_key(raw, key):
    with pytest.raises(ScenarioError) as exc:
        Scenario.from_dict(raw)
    assert str(exc.value).startswith(key + ":"), str(exc.value)


def test_error_lists_accepted_keys():
    with pytest.raises(ScenarioError, match="accepted keys here: .*parties"):
        Scenario.from_dict({"data": {"partiez": 3}})


def test_int_accepted_for_float_but_not_bool_for_int():
    assert Scenario.from_dict({"training": {"lr": 1}}).training.lr == 1.0
    with pytest.raises(ScenarioError, match="data.parties"):
        Scenario.from_dict({"data": {"parties": True}})


def test_overrides_parse_toml_values_and_bare_words():
    raw: dict = {}
    apply_overrides(
        raw, ["data.parties=5", "data.partition=dirichlet", "training.lr=0.1", "data.root=/x/y"]
    )
    assert raw == {
        "data": {"parties": 5, "partition": "dirichlet", "root": "/x/y"},
        "training": {"lr": 0.1},
    }
    sc = Scenario.from_dict(raw)
    assert sc.data.parties == 5
    with pytest.raises(ScenarioError, match="expected section.key=value"):
        apply_overrides({}, ["parties"])


def test_load_scenario_errors(tmp_path):
    with pytest.raises(ScenarioError, match="does not exist"):
        load_scenario(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[data\nparties = 3")
    with pytest.raises(ScenarioError, match="not valid TOML"):
        load_scenario(bad)
    with pytest.raises(ScenarioError, match="not found"):
        resolve_scenario_path("no_such_scenario")
