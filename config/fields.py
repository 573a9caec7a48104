"""Field types shared by the configuration models: units, bounds and PgDog's enumerations."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from annotated_types import Ge, Le, MinLen
from pydantic import AfterValidator, BaseModel, ConfigDict
from pydantic_core import PydanticCustomError


@dataclass(frozen=True)
class Unit:
    """Marks an integer field with the unit its value is in (shown in messages and docs)."""

    name: str


MILLISECONDS = Unit("milliseconds")
BYTES = Unit("bytes")
SECONDS = Unit("seconds")

# PgDog stores "disabled" timeouts as the largest TOML integer (i64::MAX milliseconds);
# we keep the same number so a value copied from PgDog's admin output means the same here.
DISABLED_MS = 2**63 - 1

# Largest value of a signed 64-bit TOML integer; PgDog uses it for "unlimited" counts.
UNLIMITED = 2**63 - 1

Millis = Annotated[int, Ge(0), MILLISECONDS]
Bytes = Annotated[int, Ge(0), BYTES]
Count = Annotated[int, Ge(0)]
PoolSize = Annotated[int, Ge(1)]
ListenPort = Annotated[int, Ge(0), Le(65535)]
ServerPort = Annotated[int, Ge(1), Le(65535)]
Byte = Annotated[int, Ge(0), Le(255)]
NonEmpty = Annotated[str, MinLen(1)]
Fraction = Annotated[float, Ge(0.0), Le(1.0)]

PoolerMode = Literal["transaction", "session", "statement"]
Role = Literal["primary", "replica", "auto"]
AuthType = Literal["scram", "md5", "trust", "plain", "external_token"]
PassthroughAuth = Literal[
    "disabled", "enabled", "enabled_plain", "enabled_allow_change", "enabled_plain_allow_change"
]
TlsVerify = Literal["disabled", "prefer", "verify_ca", "verify_full"]
LoadBalancingStrategy = Literal[
    "random", "round_robin", "least_active_connections", "weighted_round_robin"
]
ReadWriteStrategy = Literal["conservative", "aggressive"]
ReadWriteSplit = Literal[
    "include_primary", "exclude_primary", "include_primary_if_replica_banned", "prefer_primary"
]
PreparedStatements = Literal["disabled", "extended", "extended_anonymous", "full"]
QueryParserLevel = Literal["auto", "on", "off", "session_control", "session_control_and_locks"]
QueryParserEngine = Literal["pg_query_protobuf", "pg_query_raw"]
ConnectionRecovery = Literal["recover", "rollback_only", "drop"]
LogFormat = Literal["text", "json", "json_flattened"]
QuerySizeLimitAction = Literal["warn", "block"]
SystemCatalogs = Literal["omnisharded", "omnisharded_sticky", "sharded"]
CopyFormat = Literal["binary", "text"]
LoadSchema = Literal["auto", "on", "off"]
CutoverTimeoutAction = Literal["abort", "cutover"]
UniqueIdFunction = Literal["standard", "compact"]
RewriteMode = Literal["error", "ignore", "rewrite", "rewrite_omni"]
DataType = Literal["bigint", "uuid", "varchar", "vector"]
Hasher = Literal["postgres", "sha1"]
LookupResult = Literal["value", "shard"]
MappingKind = Literal["list", "range", "default"]
MirroringLevel = Literal["all", "ddl", "dml"]
ServerAuth = Literal[
    "password", "rds_iam", "azure_workload_identity", "vault", "vault_dynamic", "vault_static"
]


def _int_or_str(value: Any) -> Any:
    """Accept a TOML integer or string (a sharding key: bigint, varchar or uuid text)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise PydanticCustomError("int_or_str", "expected an integer or a string")
    return value


# A sharding key value in a list or range rule, as PgDog allows: integer, UUID text or text.
ShardingValue = Annotated[Any, AfterValidator(_int_or_str)]


class Section(BaseModel):
    """A TOML table with a fixed set of keys: unknown keys and loose types are errors."""

    model_config = ConfigDict(strict=True, extra="forbid", validate_default=False)


class LooseSection(BaseModel):
    """A PgDog table pgherd accepts without checking its keys (it does nothing with them)."""

    model_config = ConfigDict(strict=True, extra="allow")
