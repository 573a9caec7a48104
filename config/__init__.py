"""Configuration: PgDog-compatible pgherd.toml / users.toml models and loading."""

from .acted_on import ACTED_ON
from .databases import Database
from .describe import describe
from .errors import ConfigError
from .general import General
from .load import DEFAULT_CONFIG_FILE, DEFAULT_USERS_FILE, load_config
from .model import Config
from .users import Admin, User

__all__ = [
    "ACTED_ON",
    "Admin",
    "Config",
    "ConfigError",
    "Database",
    "DEFAULT_CONFIG_FILE",
    "DEFAULT_USERS_FILE",
    "General",
    "User",
    "describe",
    "load_config",
]
