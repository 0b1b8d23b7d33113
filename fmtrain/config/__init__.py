"""Run configuration: the schema (:mod:`.schema`: typed sections, their help and checks)
and its files (:mod:`.loading`: TOML in and out, dotted overrides, the command line).

    cfg = load_config("configs/tiny-gpt.toml", ["--train.steps=50", "--model.attention=sdpa"])
    save_config(cfg, cfg.run.dir)             # writes <run.dir>/config.toml
"""
from .loading import (USAGE, apply_overrides, config_from_argv, describe, from_dict, load_config, parse_args,
                      save_config, to_toml)
from .schema import (CONFIG_FILE, REMOVED_FIELDS, SECTIONS, CheckpointConfig, Config, ConfigError, DataConfig,
                     ModelConfig, ParallelConfig, RunConfig, TrainConfig, check_config, format_errors, option)

__all__ = ["Config", "RunConfig", "ModelConfig", "DataConfig", "TrainConfig", "CheckpointConfig", "ParallelConfig",
           "ConfigError", "CONFIG_FILE", "SECTIONS", "REMOVED_FIELDS", "option", "check_config", "format_errors",
           "load_config",
           "save_config", "from_dict", "apply_overrides", "to_toml", "describe", "parse_args", "config_from_argv",
           "USAGE"]
