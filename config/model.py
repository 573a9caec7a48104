"""Config: the loaded configuration, with PgDog's precedence rules (users > databases > general)."""

from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, Field

from .acted_on import ACTED_ON
from .databases import Database
from .files import PgherdToml
from .schema import primary_key
from .users import User


class Config(PgherdToml):
    """pgherd.toml and users.toml together, after environment overrides and -d URLs.

    To send it to another process, use `model_dump(exclude_unset=True)` and
    `Config.model_validate(...)`: that keeps track of which keys were set.
    """

    users: list[User] = Field(default_factory=list)
    config_path: Optional[str] = None
    users_path: Optional[str] = None

    # Precedence helpers: a value set on the user wins, then the database entry, then [general].

    def pooler_mode(self, user: User, db: Database) -> str:
        return _first(user.pooler_mode, db.pooler_mode, self.general.pooler_mode)

    def pool_size(self, user: User, db: Database) -> int:
        return _first(user.pool_size, db.pool_size, self.general.default_pool_size)

    def min_pool_size(self, user: User, db: Database) -> int:
        return _first(user.min_pool_size, db.min_pool_size, self.general.min_pool_size)

    def idle_timeout(self, user: User, db: Database) -> int:
        """Milliseconds a server connection may sit idle in the pool."""
        return _first(user.idle_timeout, db.idle_timeout, self.general.idle_timeout)

    def server_lifetime(self, user: User, db: Database) -> int:
        """Milliseconds a server connection may live before it is closed on check-in."""
        return _first(user.server_lifetime, db.server_lifetime, self.general.server_lifetime)

    def server_login(self, user: User, db: Database) -> tuple[str, Optional[str]]:
        """(user, password) for logging in to `db`: [[databases]] values win over users.toml."""
        name = _first(db.user, user.server_user, user.name)
        password = _first(db.password, user.server_password, user.password)
        return name, password

    # Lookups.

    def find_user(self, name: str, database: str) -> Optional[User]:
        """The [[users]] entry for this login; an entry naming the database exactly wins."""
        matches = [u for u in self.users if u.name == name and u.serves(database)]
        exact = [u for u in matches if u.database == database]
        return (exact or matches or [None])[0]

    def database_names(self) -> list[str]:
        """Names of the databases clients can connect to, in config order."""
        return list(dict.fromkeys(db.name for db in self.databases))

    def database_hosts(self, name: str) -> list[Database]:
        """The [[databases]] entries named `name`, ordered by shard, then config order."""
        return sorted((db for db in self.databases if db.name == name), key=lambda db: db.shard)

    def shards(self, name: str) -> list[list[Database]]:
        """The hosts of database `name` grouped by shard number (index = shard)."""
        hosts = self.database_hosts(name)
        count = max((db.shard for db in hosts), default=-1) + 1
        return [[db for db in hosts if db.shard == shard] for shard in range(count)]

    def worker_count(self) -> int:
        """Worker processes to start: general.workers, where PgDog's 0 (single thread) means 1."""
        return max(1, self.general.workers)

    def unsupported_keys(self) -> list[str]:
        """ "section.key" of every key set in the files or environment that pgherd ignores."""
        keys: set[str] = set()
        for section in PgherdToml.model_fields.keys() | {"users"}:
            value = getattr(self, section)
            for item in value if isinstance(value, list) else [value]:
                keys.update(f"{primary_key_of(section)}.{key}" for key in set_keys(item))
        return sorted(keys - ACTED_ON)


def primary_key_of(section: str) -> str:
    return primary_key(Config, section)


def set_keys(item: Any) -> list[str]:
    """The TOML keys explicitly given for one table (empty for values that are not tables)."""
    if not isinstance(item, BaseModel):
        return []
    fields = type(item).model_fields
    return [primary_key(type(item), n) if n in fields else n for n in item.model_fields_set]


def _first(*values: Any) -> Any:
    return next(v for v in values if v is not None)
