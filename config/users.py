"""users.toml: the [[users]] allowed to connect, and the [admin] table it may override."""

from __future__ import annotations

import base64
import binascii
import re
from typing import Annotated, Optional

from annotated_types import Ge, Le
from pydantic import AfterValidator, Field
from pydantic_core import PydanticCustomError

from .fields import (
    Count,
    Millis,
    NonEmpty,
    PoolerMode,
    PoolSize,
    Section,
    ServerAuth,
)

# A SCRAM-SHA-256 verifier as PostgreSQL stores it in pg_authid.rolpassword (RFC 5803 form):
# SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>, salt and keys in base64.
_SCRAM_VERIFIER = re.compile(
    r"SCRAM-SHA-256\$(?P<iterations>[0-9]+):(?P<salt>[A-Za-z0-9+/=]+)"
    r"\$(?P<stored_key>[A-Za-z0-9+/=]+):(?P<server_key>[A-Za-z0-9+/=]+)"
)
# An MD5 password hash as PostgreSQL stores it: "md5" + md5(password || username) in hex.
_MD5_HASH = re.compile(r"md5[0-9a-f]{32}")

# SHA-256 digests (StoredKey, ServerKey) are 32 bytes long.
SCRAM_KEY_BYTES = 32

PASSWORD_HASH_FORMS = (
    'a SCRAM-SHA-256 verifier ("SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>")'
    ' or an MD5 hash ("md5" followed by 32 lowercase hex digits)'
)


def _b64(text: str) -> Optional[bytes]:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def password_hash_kind(value: str) -> Optional[str]:
    """Return "scram" or "md5" for a well-formed password hash, None otherwise."""
    if _MD5_HASH.fullmatch(value):
        return "md5"
    match = _SCRAM_VERIFIER.fullmatch(value)
    if not match or int(match["iterations"]) < 1 or not _b64(match["salt"]):
        return None
    keys = (_b64(match["stored_key"]), _b64(match["server_key"]))
    if any(key is None or len(key) != SCRAM_KEY_BYTES for key in keys):
        return None
    return "scram"


def _check_password_hash(value: str) -> str:
    if password_hash_kind(value) is None:
        raise PydanticCustomError("password_hash", "expected " + PASSWORD_HASH_FORMS)
    return value


PasswordHash = Annotated[str, AfterValidator(_check_password_hash)]


class User(Section):
    """A client login: user name, the database it may use, and its pool overrides."""

    name: NonEmpty
    database: str = ""
    databases: list[str] = Field(default_factory=list)
    all_databases: bool = False
    password: Optional[str] = None
    passwords: list[str] = Field(default_factory=list)
    # pgherd also checks client logins against a stored hash instead of a plain password.
    password_hash: Optional[PasswordHash] = None
    identity: Optional[str] = None
    pool_size: Optional[PoolSize] = None
    min_pool_size: Optional[Count] = None
    pooler_mode: Optional[PoolerMode] = None
    server_user: Optional[str] = None
    server_password: Optional[str] = None
    server_auth: ServerAuth = "password"
    server_iam_region: Optional[str] = None
    server_vault_path: Optional[str] = None
    vault_path: Optional[str] = None
    vault_refresh_percent: Optional[Annotated[int, Ge(1), Le(100)]] = None
    statement_timeout: Optional[Millis] = None
    lock_timeout: Optional[Millis] = None
    replication_mode: bool = False
    replication_sharding: Optional[str] = None
    idle_timeout: Optional[Millis] = None
    client_idle_timeout: Optional[Millis] = None
    read_only: Optional[bool] = None
    schema_admin: bool = False
    cross_shard_disabled: Optional[bool] = None
    two_phase_commit: Optional[bool] = None
    two_phase_commit_auto: Optional[bool] = None
    server_lifetime: Optional[Millis] = None
    server_lifetime_jitter: Optional[Millis] = None
    tls_client_certificate_required: bool = True

    def serves(self, database: str) -> bool:
        """True if this user may connect to the database named `database`."""
        if self.all_databases:
            return True
        return database == self.database or database in self.databases

    def has_secret(self) -> bool:
        """True if a client password can be checked (a password or a hash is configured)."""
        return bool(self.password or self.passwords or self.password_hash)


class Admin(Section):
    """The admin console: `psql -U <user> <name>` with this password."""

    name: NonEmpty = "admin"
    user: NonEmpty = "admin"
    # PgDog generates a random password when unset, which locks the console; pgherd
    # leaves it None and refuses admin logins until one is set.
    password: Optional[str] = None


class UsersToml(Section):
    """The whole of users.toml."""

    users: list[User] = Field(default_factory=list)
    admin: Optional[Admin] = None
