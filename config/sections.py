"""The smaller tables of pgherd.toml: rewrite, tcp, memory, mirroring, plugins and the like."""

from __future__ import annotations

from typing import Optional

from pydantic import AliasChoices, Field

from .fields import (
    Bytes,
    Count,
    Fraction,
    ListenPort,
    Millis,
    MirroringLevel,
    NonEmpty,
    RewriteMode,
    Section,
)


class Rewrite(Section):
    """[rewrite]: what to do with statements a sharded database can only run if rewritten."""

    enabled: bool = False
    shard_key: RewriteMode = "error"
    split_inserts: RewriteMode = "error"
    primary_key: RewriteMode = "ignore"
    simple_to_prepared: bool = False


class Tcp(Section):
    """[tcp]: keep-alive and timeout socket options for client and server connections."""

    keepalive: bool = True
    time: Optional[Millis] = None
    interval: Optional[Millis] = None
    retries: Optional[Count] = None
    user_timeout: Optional[Millis] = None
    congestion_control: Optional[str] = None
    # Appears in PgDog's own example.pgdog.toml.
    connect_retries: Optional[Count] = None


class Memory(Section):
    """[memory]: buffer sizes."""

    net_buffer: Bytes = 4096
    message_buffer: Bytes = 4096
    stack_size: Bytes = 2 * 1024 * 1024


class MultiTenant(Section):
    """[multi_tenant]: the column every query must filter on."""

    column: NonEmpty


class Mirroring(Section):
    """[[mirroring]]: copy traffic from one database to another."""

    source_db: NonEmpty
    destination_db: NonEmpty
    # PgDog's code reads queue_length; its documentation calls it queue_depth.
    queue_length: Optional[Count] = Field(
        default=None, validation_alias=AliasChoices("queue_length", "queue_depth")
    )
    exposure: Optional[Fraction] = None
    level: MirroringLevel = "all"


class Plugin(Section):
    """[[plugins]]: a shared library PgDog loads at startup."""

    name: NonEmpty
    config: Optional[str] = None


class ReplicaLag(Section):
    """[replica_lag]: ban lagging replicas (PgDog's defaults apply once the table exists)."""

    check_interval: Optional[Millis] = None
    max_age: Optional[Millis] = None


class Replication(Section):
    """[replication]: tools used for online resharding."""

    pg_dump_path: str = "pg_dump"


class Otel(Section):
    """[otel]: OpenTelemetry metrics push exporter."""

    endpoint: Optional[str] = None
    namespace: Optional[str] = None
    headers: dict[str, str] = Field(default_factory=dict)
    datadog_api_key: Optional[str] = None
    push_interval: Millis = 10_000
    temporality_preference: Optional[str] = None


class Fdw(Section):
    """[fdw]: PgDog's postgres_fdw helper processes."""

    enabled: bool = False
    green_port: ListenPort = 6433
    blue_port: ListenPort = 6434
    launch_timeout: Millis = 5_000
