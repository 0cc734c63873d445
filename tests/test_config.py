"""Configs: defaults, YAML, dotted overrides, and errors that name the key and the choices."""

import pytest

from locallearn.config import ConfigError, from_dict, load_config, to_dict
from locallearn.objectives import OBJECTIVES, build_objective
from locallearn.objectives.base import objective_options


def test_defaults_and_overrides(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("model: {name: resnet20, options: {width: 0.5}}\nsplit: {k: 2}\n")
    cfg = load_config(f, ["split.k=4", "engine=backprop", "optim.lr=1", "split.cuts=[1, 2, 3]"])
    assert cfg.model.name == "resnet20" and cfg.model.options == {"width": 0.5}
    assert cfg.split.k == 4 and cfg.split.cuts == (1, 2, 3)
    assert cfg.engine.name == "backprop"
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert from_dict(to_dict(cfg)) == cfg


@pytest.mark.parametrize("override, words", [
    ("split.kk=2", ["split.kk", "k, by, cuts"]),
    ("foo=1", ["'foo'", "model, data"]),
    ("engine=foo", ["engine.name='foo'", "backprop, local, pipeline"]),
    ("train.epochs=abc", ["train.epochs", "expected int"]),
    ("split.k=0", ["split.k=0", "at least 1"]),
    ("optim.schedule=exp", ["optim.schedule", "cosine"]),
    ("novalue", ["key=value"]),
    ("model.options={width:", ["model.options={width:", "not valid YAML"]),
])
def test_errors_name_the_key(override, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    for w in words:
        assert w in str(e.value)


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_an_objective_option_the_objective_does_not_read_is_refused_naming_what_it_reads(name):
    with pytest.raises(ConfigError) as e:
        build_objective(name, (8, 4, 4), 10, head="mlp", last=False, bogus=1)
    known = objective_options(name)
    assert str(e.value) == (f"unknown {name} option 'bogus' (objective.options); objective "
                            f"{name!r} accepts: {', '.join(known)}")
    assert {"pool", "momentum_aux"} <= set(known) and not {"head", "last", "stage"} & set(known)


def test_a_typo_in_objective_options_stops_the_build_of_a_run_and_a_wrapped_objective():
    from locallearn.build import build_data, build_net

    cfg = load_config(None, ["model=mlp", "data=digits", "objective=ce", "split.k=2",
                             "objective.options={hiden: [64], bogus: 1}"])
    with pytest.raises(ConfigError, match=r"^unknown ce options 'hiden', 'bogus' "
                                          r"\(objective.options\); objective 'ce' accepts: "
                                          r"hidden, momentum_aux, pool$"):
        build_net(cfg, build_data(cfg))
    with pytest.raises(ConfigError, match="unknown supcon option 'temprature'.*temperature"):
        build_objective("supcon", (8, 4, 4), 10, momentum_aux=0.9, temprature=0.1)


@pytest.mark.parametrize("key,hint", [("head", "set objective.head instead"),
                                      ("last", "set by the library from the split"),
                                      ("stage", "set by the library from the split")])
def test_objective_options_the_library_sets_itself_are_refused_naming_the_key(key, hint):
    from locallearn.build import build_data, build_net

    cfg = load_config(None, ["model=mlp", "data=digits", "objective=ce", "split.k=2",
                             f"objective.options={{{key}: 1}}"])
    with pytest.raises(ConfigError, match=rf"^objective.options.{key} .*{hint}"):
        build_net(cfg, build_data(cfg))
