"""One typed config tree, loaded from YAML/JSON and `key=value` overrides."""

from lathe.config.load import known_keys, load_config, save_config, to_flat_dict
from lathe.config.schema import LatheConfig

__all__ = ["LatheConfig", "known_keys", "load_config", "save_config", "to_flat_dict"]
