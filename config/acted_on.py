"""The keys pgherd acts on today; every other modeled key is accepted and reported at startup."""

from __future__ import annotations

# Single source of truth: docs/configuration.md must mention each of these
# (tests/unit/test_config.py checks it), and Config.unsupported_keys() reports
# every key set in the files or the environment that is not listed here.
ACTED_ON: frozenset[str] = frozenset(
    {
        "general.host",
        "general.port",
        "general.workers",
        "general.default_pool_size",
        "general.min_pool_size",
        "general.pooler_mode",
        "general.checkout_timeout",
        "general.connect_timeout",
        "general.connect_attempts",
        "general.connect_attempt_delay",
        "general.rollback_timeout",
        "general.log_level",
        "general.idle_timeout",
        "general.server_lifetime",
        "general.auth_type",
        "general.client_login_timeout",
        "general.max_message_size",
        "general.shutdown_timeout",
        "databases.name",
        "databases.host",
        "databases.port",
        "databases.database_name",
        "databases.role",
        "databases.shard",
        "databases.user",
        "databases.password",
        "databases.pool_size",
        "databases.min_pool_size",
        "databases.pooler_mode",
        "databases.idle_timeout",
        "databases.server_lifetime",
        "users.name",
        "users.database",
        "users.databases",
        "users.all_databases",
        "users.password",
        "users.password_hash",
        "users.pool_size",
        "users.min_pool_size",
        "users.pooler_mode",
        "users.server_user",
        "users.server_password",
        "users.idle_timeout",
        "users.server_lifetime",
    }
)
