"""The typed config: YAML + overrides, and errors that name the key and where it came from."""

import pytest

from dclr_dist.config import Config, ConfigError, config_from_dict, load_config


def test_defaults_and_yaml_and_overrides(tmp_path):
    assert load_config() == Config()
    path = tmp_path / "c.yaml"
    path.write_text("shard:\n  crf: 28\n  fps: 15\n")
    cfg = load_config(path, ["shard.gop=8", "shard.fps=null", "shard.prefix=001"])
    assert (cfg.shard.crf, cfg.shard.gop, cfg.shard.fps, cfg.shard.prefix) == (28, 8, None, "001")
    assert isinstance(load_config(path).shard.fps, float)  # an int in YAML is a valid float
    assert config_from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("text, message", [
    ("shard:\n  crff: 1\n", "c.yaml: unknown key 'shard.crff' (did you mean 'crf'?)"),
    ("shardd:\n  crf: 1\n", "c.yaml: unknown key 'shardd' (did you mean 'shard'?)"),
    ("shard:\n  crf: high\n", "c.yaml: shard.crf must be int, got str 'high'"),
    ("shard:\n  crf: 1.5\n", "c.yaml: shard.crf must be int, got float 1.5"),
    ("shard:\n  crf: true\n", "c.yaml: shard.crf must be int, got bool True"),
    ("shard:\n  short_side: 129\n", "c.yaml: shard.short_side must be an even number"),
    ("shard: 3\n", "c.yaml: shard must be a mapping, got int"),
    ("- a\n", "c.yaml: top level must be a mapping"),
    ("shard: [\n", "c.yaml: not valid YAML"),
])
def test_file_errors_name_key_and_file(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert message in str(e.value)


@pytest.mark.parametrize("override, message", [
    ("shard.crf", "must look like section.key=value"),
    ("shard.crf=abc", "command line: shard.crf must be int, got str 'abc'"),
    ("shard.cfr=20", "command line: unknown key 'shard.cfr' (did you mean 'crf'?) in section 'shard'"),
    ("shard.crf.x=1", "shard.crf is not a section"),
    ("nope=1", "unknown key 'nope'"),
])
def test_override_errors(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value)


def test_missing_file():
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config("nope.yaml")
