"""Configs: defaults, YAML, dotted overrides, and errors that name the key and the choices."""

import pytest

from locallearn.config import ConfigError, from_dict, load_config, to_dict


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
