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


@pytest.mark.parametrize(
    "text, message",
    [
        ("shard:\n  crff: 1\n", "c.yaml: unknown key 'shard.crff' (did you mean 'crf'?)"),
        ("shardd:\n  crf: 1\n", "c.yaml: unknown key 'shardd' (did you mean 'shard'?)"),
        ("shard:\n  crf: high\n", "c.yaml: shard.crf must be int, got str 'high'"),
        ("shard:\n  crf: 1.5\n", "c.yaml: shard.crf must be int, got float 1.5"),
        ("shard:\n  crf: true\n", "c.yaml: shard.crf must be int, got bool True"),
        ("shard:\n  short_side: 129\n", "c.yaml: shard.short_side must be an even number"),
        ("shard: 3\n", "c.yaml: shard must be a mapping, got int"),
        ("- a\n", "c.yaml: top level must be a mapping"),
        ("shard: [\n", "c.yaml: not valid YAML"),
    ],
)
def test_file_errors_name_key_and_file(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert message in str(e.value)


@pytest.mark.parametrize(
    "override, message",
    [
        ("shard.crf", "must look like section.key=value"),
        ("shard.crf=abc", "command line: shard.crf must be int, got str 'abc'"),
        ("shard.cfr=20", "command line: unknown key 'shard.cfr' (did you mean 'crf'?) in section 'shard'"),
        ("shard.crf.x=1", "shard.crf is not a section"),
        ("nope=1", "unknown key 'nope'"),
        # Out of bounds: every value from outside is checked before it reaches a timer or a path.
        ("loss.tau=.inf", "loss.tau must be a finite number, got"),
        ("optim.lr=inf", "optim.lr must be a finite number"),
        ("optim.lr=nan", "optim.lr must be a finite number"),
        ("shard.input_timeout=1e9", "shard.input_timeout must be > 0 and at most 604800"),
        ("shard.input_timeout=inf", "shard.input_timeout must be a finite number"),
        ("shard.fps=0.001", "shard.fps must be from 1 to 240"),
        ("shard.short_side=100000", "shard.short_side must be an even number from 16 to 2160"),
        ("checkpoint.minutes=1e12", "checkpoint.minutes must be > 0 and at most a week"),
        ("train.name=..", "train.name must be a folder name"),
        ("train.name=a/b", "train.name must be a folder name"),
        ("train.name=my run", "train.name must be a folder name"),
        ("train.storage_path=", "train.storage_path must be a folder or s3://bucket/prefix"),
    ],
)
def test_override_errors(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value)


def test_missing_file():
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config("nope.yaml")


def test_keys_that_moved_to_their_owners_section(tmp_path):
    """A file or override with a key from before the sections were split by owner is told its new
    name; a saved tree (an older checkpoint's meta.json) is read in today's keys."""
    path = tmp_path / "old.yaml"
    path.write_text("train:\n  workers: 4\n")
    with pytest.raises(
        ConfigError,
        match=r"old.yaml: unknown key 'train.workers' \(train.workers is now "
        r"cluster.workers: rename it\)",
    ):
        load_config(path)
    with pytest.raises(ConfigError, match=r"'eval.t' \(eval.t is now eval.knn_temperature"):
        load_config(None, ["eval.t=0.1"])
    old = Config().to_dict()
    old["train"].update(workers=4, zero_stage=1, lr=0.5, checkpoint_every=3)
    old["eval"]["finetune_lr"] = 0.2
    old["model"]["m"] = old["model"].pop("momentum")
    for section in ("cluster", "optim", "engine", "checkpoint", "finetune"):
        del old[section]
    cfg = config_from_dict(old)
    assert (
        cfg.cluster.workers,
        cfg.engine.zero_stage,
        cfg.optim.lr,
        cfg.checkpoint.every,
        cfg.finetune.lr,
        cfg.model.momentum,
    ) == (4, 1, 0.5, 3, 0.2, 0.999)


@pytest.mark.parametrize("value", ["five", "0", "-1", "1e3"])
def test_a_bad_aws_max_attempts_is_one_line_naming_it(monkeypatch, value):
    from dclr_dist import storage
    from dclr_dist.launch import forwarded_env

    monkeypatch.setenv("AWS_MAX_ATTEMPTS", value)
    for call in (storage.max_attempts, forwarded_env):
        with pytest.raises(storage.StorageError) as e:
            call()
        assert str(e.value).startswith(f"AWS_MAX_ATTEMPTS={value!r}: must be a whole number") and "\n" not in str(
            e.value
        )
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "7")
    assert storage.max_attempts() == 7 and forwarded_env()["AWS_MAX_ATTEMPTS"] == "7"


@pytest.mark.parametrize(
    "override, shards",
    [
        ("data.train=[s3://b/shard-{000000..000009}.tar]", ["s3://b/shard-{000000..000009}.tar"]),
        ("data.train=s3://b/shard-{000000..000009}.tar", ["s3://b/shard-{000000..000009}.tar"]),
        ("data.train=[a/{0,1}.tar, b]", ["a/{0,1}.tar", "b"]),
        ("data.eval=runs/packed", ["runs/packed"]),
    ],
)
def test_a_quoted_brace_pattern_or_a_bare_path_is_a_list_of_shards(override, shards):
    key = override.split("=")[0].split(".")[1]
    assert getattr(load_config(None, [override]).data, key) == shards


def test_an_unquoted_brace_pattern_the_shell_expanded_is_told_to_quote_it():
    # bash turns data.train=[s/{0..2}.tar] into one argument per shard; only the last would count.
    with pytest.raises(ConfigError, match=r"data.train given 3 times; .* quote it"):
        load_config(None, [f"data.train=[s/{i}.tar]" for i in range(3)])
