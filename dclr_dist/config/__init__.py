"""One typed configuration for every stage, loaded from YAML with ``key=value`` overrides.

Each component owns one section, a dataclass whose docstring names it: ``method.py`` holds
the method's and its data's, ``run.py`` those of running it; ``load.py`` reads YAML and
overrides. The whole tree is validated before anything expensive starts, so an unknown key
or a wrong type fails in milliseconds with a message naming the key and the file, not an
hour into a Ray job.

    cfg = load_config("demo", ["shard.crf=28", "shard.fps=15"])   # a shipped recipe, or a path
"""

from dclr_dist.config.errors import ConfigError
from dclr_dist.config.load import MOVED, RECIPES, config_from_dict, load_config, read_yaml, recipe_path
from dclr_dist.config.method import BASELINE, DataConfig, LossConfig, ModelConfig, ShardConfig, ViewsConfig
from dclr_dist.config.run import (
    CheckpointConfig,
    ClusterConfig,
    Config,
    EngineConfig,
    EvalConfig,
    FinetuneConfig,
    OptimConfig,
    TrainConfig,
)

__all__ = [
    "BASELINE",
    "MOVED",
    "RECIPES",
    "CheckpointConfig",
    "ClusterConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "EngineConfig",
    "EvalConfig",
    "FinetuneConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "ShardConfig",
    "TrainConfig",
    "ViewsConfig",
    "config_from_dict",
    "load_config",
    "read_yaml",
    "recipe_path",
]
