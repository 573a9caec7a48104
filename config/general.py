"""The [general] table of pgherd.toml: PgDog's keys, defaults and units, plus extensions."""

from __future__ import annotations

import os
from typing import Annotated, Optional

from annotated_types import Ge
from pydantic import AliasChoices, Field

from .fields import (
    BYTES,
    DISABLED_MS,
    UNLIMITED,
    AuthType,
    Bytes,
    ConnectionRecovery,
    CopyFormat,
    Count,
    CutoverTimeoutAction,
    Fraction,
    ListenPort,
    LoadBalancingStrategy,
    LoadSchema,
    LogFormat,
    Millis,
    PassthroughAuth,
    PoolerMode,
    PoolSize,
    PreparedStatements,
    QueryParserEngine,
    QueryParserLevel,
    QuerySizeLimitAction,
    ReadWriteSplit,
    ReadWriteStrategy,
    Section,
    SystemCatalogs,
    TlsVerify,
    UniqueIdFunction,
)

# pgherd extension: the largest protocol message a client may send. PostgreSQL itself allows
# up to 1 GiB - 1; a worker holds a whole message in memory before routing it, so 64 MiB bounds
# what one client can make a worker buffer while still fitting large bytea/text parameters.
DEFAULT_MAX_MESSAGE_SIZE = 64 * 1024 * 1024

# Smallest max_message_size we accept: below this, ordinary startup packets and queries break.
MIN_MAX_MESSAGE_SIZE = 8192


def default_workers() -> int:
    """pgherd runs one worker process per CPU core unless told otherwise (PgDog's default is 2)."""
    return os.cpu_count() or 1


class General(Section):
    """Settings for the pooler itself and defaults for every pool."""

    # Listener.
    host: str = "0.0.0.0"
    port: ListenPort = 6432
    listen_backlog: Count = 1024
    workers: Count = Field(default_factory=default_workers)
    background_workers: Count = 0

    # Pools.
    default_pool_size: PoolSize = Field(
        default=10, validation_alias=AliasChoices("default_pool_size", "max_pool_size")
    )
    min_pool_size: Count = 1
    pooler_mode: PoolerMode = "transaction"

    # Health checks and bans.
    healthcheck_interval: Millis = 30_000
    idle_healthcheck_interval: Millis = 30_000
    idle_healthcheck_delay: Millis = 5_000
    healthcheck_timeout: Millis = 5_000
    healthcheck_port: Optional[ListenPort] = None
    require_healthcheck_on_discovery: bool = False
    ban_timeout: Millis = 300_000
    ban_replica_lag: Millis = DISABLED_MS
    ban_replica_lag_bytes: Bytes = UNLIMITED
    rollback_timeout: Millis = 5_000

    # Load balancing and read/write splitting.
    load_balancing_strategy: LoadBalancingStrategy = "random"
    read_write_strategy: ReadWriteStrategy = "conservative"
    read_write_split: ReadWriteSplit = "include_primary"
    read_after_write_ms: Millis = 0
    primary_functions: list[str] = Field(default_factory=list)
    route_unknown_functions_to_primary: bool = False

    # TLS.
    tls_certificate: Optional[str] = None
    tls_private_key: Optional[str] = None
    tls_client_required: bool = False
    tls_verify: TlsVerify = "prefer"
    tls_server_ca_certificate: Optional[str] = None
    tls_server_certificate: Optional[str] = None
    tls_server_private_key: Optional[str] = None
    tls_client_ca_certificate: Optional[str] = None

    # Shutdown.
    shutdown_timeout: Millis = 60_000
    shutdown_termination_timeout: Optional[Millis] = None

    # Multi-instance coordination.
    broadcast_address: Optional[str] = None
    broadcast_port: ListenPort = 6433

    # Query logging and limits.
    query_log: Optional[str] = None
    query_log_stdout: bool = False
    log_min_duration_parse: Optional[Millis] = None
    log_query_sample_length: Count = 1000
    query_size_limit: Optional[Bytes] = None
    query_size_limit_action: QuerySizeLimitAction = "warn"

    # Metrics.
    openmetrics_host: str = "0.0.0.0"
    openmetrics_port: Optional[ListenPort] = None
    openmetrics_namespace: Optional[str] = None

    # Prepared statements and the query parser.
    prepared_statements: PreparedStatements = "extended"
    query_parser_enabled: bool = False
    query_parser: QueryParserLevel = "auto"
    regex_parser_limit: Bytes = 1000
    query_parser_engine: QueryParserEngine = "pg_query_protobuf"
    prepared_statements_limit: Count = UNLIMITED
    prepared_statements_ttl: Optional[Millis] = None
    prepared_statements_ttl_jitter: Millis = 30_000
    query_cache_limit: Count = 1000

    # Authentication.
    passthrough_auth: PassthroughAuth = "disabled"
    auth_type: AuthType = "scram"

    # Server connections.
    connect_timeout: Millis = 5_000
    connect_attempts: Annotated[int, Ge(1)] = 1
    connect_attempt_delay: Millis = 0
    query_timeout: Millis = DISABLED_MS
    checkout_timeout: Millis = 5_000
    idle_timeout: Millis = 60_000
    server_lifetime: Millis = 86_400_000
    server_lifetime_jitter: Millis = 0
    connection_recovery: ConnectionRecovery = "recover"
    dns_ttl: Optional[Millis] = None

    # Client connections.
    client_login_timeout: Millis = 60_000
    client_idle_timeout: Millis = DISABLED_MS
    client_idle_in_transaction_timeout: Millis = DISABLED_MS
    client_connection_recovery: ConnectionRecovery = "drop"

    # Sharding.
    dry_run: bool = False
    cross_shard_disabled: bool = False
    expanded_explain: bool = False
    system_catalogs: SystemCatalogs = "omnisharded_sticky"
    omnisharded_sticky: bool = False
    sharding_lookup_cache_size: Bytes = 64 * 1024 * 1024
    sharding_lookup_timeout: Millis = 5_000
    unique_id_min: Count = 0
    unique_id_function: UniqueIdFunction = "standard"

    # Two-phase commit.
    two_phase_commit: bool = False
    two_phase_commit_auto: Optional[bool] = None
    two_phase_commit_wal_dir: Optional[str] = None
    two_phase_commit_wal_segment_size: Bytes = 16 * 1024 * 1024
    two_phase_commit_wal_fsync_interval: Millis = 0
    two_phase_commit_wal_checkpoint_interval: Millis = 15_000

    # Mirroring.
    mirror_queue: Count = 128
    mirror_exposure: Fraction = 1.0

    # Pub/sub.
    pub_sub_channel_size: Count = 0

    # Logging and statistics.
    log_format: LogFormat = "text"
    log_level: str = "info"
    log_connections: bool = True
    log_disconnections: bool = True
    log_dedup_window: Millis = 0
    log_dedup_threshold: Count = 0
    stats_period: Millis = 15_000

    # Replication lag checks.
    lsn_check_interval: Millis = 5_000
    lsn_check_timeout: Millis = 5_000
    lsn_check_delay: Millis = DISABLED_MS

    # Resharding and cutover.
    resharding_copy_format: CopyFormat = "binary"
    resharding_parallel_copies: Count = 1
    resharding_copy_retry_max_attempts: Count = 5
    resharding_copy_retry_min_delay: Millis = 1_000
    resharding_replication_retry_max_attempts: Count = 5
    resharding_replication_retry_min_delay: Millis = 1_000
    reload_schema_on_ddl: bool = True
    load_schema: LoadSchema = "auto"
    canonicalize_type_information: bool = False
    cutover_traffic_stop_threshold: Bytes = 1_000_000
    cutover_replication_lag_threshold: Bytes = 0
    cutover_last_transaction_delay: Millis = 1_000
    cutover_timeout: Millis = 30_000
    cutover_timeout_action: CutoverTimeoutAction = "abort"
    cutover_save_config: bool = False

    # pgherd extensions (not in PgDog).
    max_message_size: Annotated[int, Ge(MIN_MAX_MESSAGE_SIZE), BYTES] = DEFAULT_MAX_MESSAGE_SIZE
    node_id: Optional[Count] = None


# Keys of [general] that PgDog does not have; docs/configuration.md lists them as extensions.
PGHERD_EXTENSIONS = frozenset({"max_message_size", "node_id"})
