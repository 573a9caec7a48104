"""Unit tests for pgherd.config: models, defaults, errors, environment, -d URLs, describe()."""

from __future__ import annotations

import os
import re
import textwrap
from pathlib import Path

import pytest
from pgherd.config import ACTED_ON, Config, ConfigError, describe, load_config
from pgherd.config.reference import all_keys

EXAMPLES = Path(__file__).resolve().parents[2] / "config" / "examples"
DOCS = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"

SCRAM_VERIFIER = (
    "SCRAM-SHA-256$4096:c2FsdHNhbHRzYWx0$"
    "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=:"
    "ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8="
)
MD5_HASH = "md5" + "0123456789abcdef" * 2

ONE_DB = """
[[databases]]
name = "prod"
host = "127.0.0.1"
"""

ONE_USER = """
[[users]]
name = "app"
database = "prod"
password = "secret"
"""


@pytest.fixture
def files(tmp_path, monkeypatch):
    """Write pgherd.toml / users.toml into a fresh working directory; messages then say
    "pgherd.toml:" and "users.toml:" because load_config() uses the default names."""
    monkeypatch.chdir(tmp_path)

    def write(pgherd: str | None = ONE_DB, users: str | None = ONE_USER) -> Path:
        if pgherd is not None:
            (tmp_path / "pgherd.toml").write_text(textwrap.dedent(pgherd))
        if users is not None:
            (tmp_path / "users.toml").write_text(textwrap.dedent(users))
        return tmp_path

    return write


def load(**kwargs) -> Config:
    kwargs.setdefault("env", {})
    return load_config(**kwargs)


def errors_of(**kwargs) -> list[str]:
    kwargs.setdefault("env", {})
    with pytest.raises(ConfigError) as caught:
        load_config(**kwargs)
    return caught.value.errors


# ----- unknown keys --------------------------------------------------------------------


def test_unknown_general_key_suggests_the_right_one(files):
    files(pgherd=ONE_DB + "[general]\ndefualt_pool_size = 5\n")
    assert errors_of() == [
        'pgherd.toml: [general] unknown key "defualt_pool_size"; did you mean "default_pool_size"?'
    ]


def test_unknown_database_key_names_the_entry(files):
    files(pgherd=ONE_DB + '[[databases]]\nname = "prod"\nhost = "h2"\nrol = "replica"\n')
    assert errors_of() == ['pgherd.toml: [[databases]] #2 unknown key "rol"; did you mean "role"?']


def test_unknown_user_key(files):
    files(users='[[users]]\nname = "app"\ndatabase = "prod"\npassword = "x"\npool_sise = 3\n')
    assert errors_of() == [
        'users.toml: [[users]] #1 unknown key "pool_sise"; did you mean "pool_size"?'
    ]


def test_unknown_key_in_nested_mapping(files):
    files(
        pgherd=ONE_DB
        + """
        [[sharded_tables]]
        database = "prod"
        column = "id"

        [[sharded_tables.mapping]]
        shard = 0
        valeus = [1, 2]
        """
    )
    assert errors_of() == [
        'pgherd.toml: [[sharded_tables]] #1 [[sharded_tables.mapping]] #1 unknown key "valeus"; '
        'did you mean "values"?'
    ]


def test_key_of_another_table_says_where_it_belongs(files):
    files(users='[[users]]\nname = "app"\ndatabase = "prod"\npassword = "x"\nrole = "replica"\n')
    (error,) = errors_of()
    assert error.startswith('users.toml: [[users]] #1 unknown key "role"')
    assert '"role" is a key of [[databases]]' in error


def test_unknown_top_level_table(files):
    files(pgherd=ONE_DB + "[genral]\nport = 1\n")
    assert errors_of() == ["pgherd.toml: unknown top-level table [genral]; did you mean [general]?"]


def test_users_table_in_pgherd_toml_points_to_users_toml(files):
    files(pgherd=ONE_DB + ONE_USER)
    assert errors_of() == [
        "pgherd.toml: unknown top-level table [[users]]; it belongs in users.toml"
    ]


def test_general_key_above_the_general_header(files):
    files(pgherd="port = 7000\n" + ONE_DB)
    (error,) = errors_of()
    assert error.startswith('pgherd.toml: unknown top-level key "port"')
    assert "[general]" in error


# ----- wrong types and values ----------------------------------------------------------


def test_wrong_type_names_expected_type_and_value(files):
    files(pgherd=ONE_DB + '[general]\nport = "abc"\n')
    assert errors_of() == ['pgherd.toml: [general] port: expected an integer, found "abc"']


def test_out_of_range_value_names_the_range(files):
    files(pgherd=ONE_DB + "[general]\nport = 70000\n")
    assert errors_of() == [
        "pgherd.toml: [general] port: expected an integer from 0 to 65535, found 70000"
    ]


def test_milliseconds_are_named_as_the_unit(files):
    files(pgherd=ONE_DB + '[general]\ncheckout_timeout = "5s"\n')
    assert errors_of() == [
        'pgherd.toml: [general] checkout_timeout: expected an integer number of milliseconds, found "5s"'
    ]


def test_float_for_an_integer_is_rejected(files):
    files(pgherd=ONE_DB + "[general]\nidle_timeout = 53.5\n")
    assert errors_of() == [
        "pgherd.toml: [general] idle_timeout: expected an integer number of milliseconds, found 53.5"
    ]


def test_enum_value_lists_choices_and_suggests(files):
    files(pgherd='[[databases]]\nname = "prod"\nhost = "h"\nrole = "replcia"\n')
    assert errors_of() == [
        'pgherd.toml: [[databases]] #1 role: expected one of "primary", "replica", "auto", '
        'found "replcia"; did you mean "replica"?'
    ]


def test_pooler_mode_must_be_a_known_mode(files):
    files(users=ONE_USER + 'pooler_mode = "pipeline"\n')
    assert errors_of() == [
        'users.toml: [[users]] #1 pooler_mode: expected one of "transaction", "session", '
        '"statement", found "pipeline"'
    ]


def test_missing_required_key(files):
    files(pgherd='[[databases]]\nname = "prod"\n')
    assert errors_of() == ['pgherd.toml: [[databases]] #1 missing required key "host"']


def test_table_instead_of_array_of_tables(files):
    files(pgherd='[databases]\nname = "prod"\nhost = "h"\n')
    (error,) = errors_of()
    assert error == (
        "pgherd.toml: databases: expected an array of tables ([[databases]] entries), found a table"
    )


def test_password_values_are_never_echoed(files):
    files(users='[[users]]\nname = "app"\ndatabase = "prod"\npassword = 12345\n')
    (error,) = errors_of()
    assert error == "users.toml: [[users]] #1 password: expected a string, found an integer"
    assert "12345" not in error


def test_malformed_password_hash(files):
    files(users='[[users]]\nname = "app"\ndatabase = "prod"\npassword_hash = "md5nothex"\n')
    (error,) = errors_of()
    assert error.startswith(
        "users.toml: [[users]] #1 password_hash: expected a SCRAM-SHA-256 verifier"
    )
    assert "md5nothex" not in error


# ----- syntax and files ----------------------------------------------------------------


def test_toml_syntax_error_has_line_and_column(files):
    files(pgherd="[general]\nport = \n")
    (error,) = errors_of()
    assert re.fullmatch(r"pgherd\.toml: line 2, column \d+: TOML syntax error: .+", error)


def test_missing_default_files_are_errors_without_urls(files):
    files(pgherd=None, users=None)
    errors = errors_of()
    assert len(errors) == 2
    assert errors[0].startswith("pgherd.toml: file not found in ")
    assert errors[1].startswith("users.toml: file not found in ")
    assert "-d postgres://" in errors[0]


def test_missing_default_files_are_fine_with_urls(files):
    files(pgherd=None, users=None)
    config = load(database_urls=["postgres://app:pw@db:5433/prod"])
    assert [db.host for db in config.databases] == ["db"]


def test_explicit_missing_file_is_an_error_even_with_urls(files, tmp_path):
    missing = tmp_path / "elsewhere.toml"
    errors = errors_of(config_path=missing, database_urls=["postgres://a:b@h/d"])
    assert errors == [f"{missing}: file not found"]


def test_explicit_paths_are_used(tmp_path):
    (tmp_path / "a.toml").write_text(ONE_DB)
    (tmp_path / "b.toml").write_text(ONE_USER)
    config = load(config_path=str(tmp_path / "a.toml"), users_path=tmp_path / "b.toml")
    assert config.database_names() == ["prod"]
    assert config.config_path == str(tmp_path / "a.toml")


# ----- checks across keys and files ----------------------------------------------------


def test_database_without_user(files):
    files(pgherd=ONE_DB + '[[databases]]\nname = "other"\nhost = "h"\n')
    assert errors_of() == [
        'users.toml: no [[users]] entry for database "other"; add one with database = "other"'
    ]


def test_user_without_password_unless_trust(files):
    no_password = '[[users]]\nname = "app"\ndatabase = "prod"\n'
    files(users=no_password)
    (error,) = errors_of()
    assert error.startswith('users.toml: user "app" (database "prod") has no password')
    files(pgherd=ONE_DB + '[general]\nauth_type = "trust"\n', users=no_password)
    assert load().users[0].password is None


def test_password_hash_replaces_password(files):
    files(users=f'[[users]]\nname = "app"\ndatabase = "prod"\npassword_hash = "{SCRAM_VERIFIER}"\n')
    assert load().users[0].password_hash == SCRAM_VERIFIER


def test_password_hash_must_suit_auth_type(files):
    md5 = ONE_DB + '[general]\nauth_type = "md5"\n'
    files(
        pgherd=md5,
        users=f'[[users]]\nname = "app"\ndatabase = "prod"\npassword_hash = "{SCRAM_VERIFIER}"\n',
    )
    (error,) = errors_of()
    assert "SCRAM-SHA-256 password_hash cannot check md5 logins" in error
    files(
        pgherd=md5,
        users=f'[[users]]\nname = "app"\ndatabase = "prod"\npassword_hash = "{MD5_HASH}"\n',
    )
    assert load().users[0].password_hash == MD5_HASH


def test_duplicate_database_entries(files):
    files(pgherd=ONE_DB + ONE_DB)
    assert errors_of() == [
        'pgherd.toml: [[databases]] lists database "prod" shard 0 primary at 127.0.0.1:5432 '
        "twice; remove one of the entries"
    ]


def test_primary_and_replica_may_share_a_server(files):
    files(pgherd=ONE_DB + '[[databases]]\nname = "prod"\nhost = "127.0.0.1"\nrole = "replica"\n')
    assert [db.role for db in load().databases] == ["primary", "replica"]


def test_shard_numbers_must_not_skip(files):
    files(pgherd=ONE_DB + '[[databases]]\nname = "prod"\nhost = "h"\nshard = 2\n')
    (error,) = errors_of()
    assert error.startswith('pgherd.toml: database "prod" has no [[databases]] entry for shard 1')


def test_mapping_rule_is_list_or_range_not_both(files):
    files(
        pgherd=ONE_DB
        + """
        [[sharded_tables]]
        database = "prod"
        column = "id"
        [[sharded_tables.mapping]]
        values = [1]
        start = 0
        shard = 0
        """
    )
    (error,) = errors_of()
    assert "mapping rule #1 sets both values and start/end" in error


def test_no_databases_at_all(files):
    files(pgherd="[general]\nport = 6432\n", users="")
    assert errors_of() == [
        "pgherd.toml: no [[databases]] configured; add a [[databases]] entry or pass "
        "-d postgres://user:password@host:port/database"
    ]


def test_all_errors_are_reported_at_once(files):
    files(
        pgherd="""
            [general]
            port = "abc"
            defualt_pool_size = 5

            [[databases]]
            name = "prod"
            host = "127.0.0.1"

            [[databases]]
            name = "other"
            host = "10.0.0.1"
            role = "master"
            """,
        users=ONE_USER + "pasword = 1\n",
    )
    with pytest.raises(ConfigError) as caught:
        load_config(env={"PGHERD_WORKERS": "many"})
    errors = caught.value.errors
    assert errors == [
        'environment: PGHERD_WORKERS: expected an integer, found "many"',
        'pgherd.toml: [general] port: expected an integer, found "abc"',
        'pgherd.toml: [general] unknown key "defualt_pool_size"; did you mean "default_pool_size"?',
        'pgherd.toml: [[databases]] #2 role: expected one of "primary", "replica", "auto", found "master"',
        'users.toml: [[users]] #1 unknown key "pasword"; did you mean "password"?',
        'users.toml: no [[users]] entry for database "other"; add one with database = "other"',
    ]
    assert str(caught.value) == "\n".join(errors)


# ----- environment ---------------------------------------------------------------------


def test_env_overrides_file_and_pgherd_wins_over_pgdog(files):
    files(pgherd=ONE_DB + "[general]\nport = 6000\n")
    env = {"PGHERD_PORT": "7000", "PGDOG_PORT": "8000", "PGDOG_DEFAULT_POOL_SIZE": "33"}
    config = load_config(env=env)
    assert config.general.port == 7000
    assert config.general.default_pool_size == 33


def test_env_values_are_parsed_to_the_field_type(files):
    files()
    env = {
        "PGHERD_POOLER_MODE": "Session",
        "PGHERD_DRY_RUN": "yes",
        "PGDOG_TLS_VERIFY": "verify-full",
        "PGHERD_MIRROR_EXPOSURE": "0.5",
        "PGHERD_NODE_ID": "3",
        "PGHERD_PRIMARY_FUNCTIONS": "nextval, setval",
    }
    general = load_config(env=env).general
    assert general.pooler_mode == "session"
    assert general.dry_run is True
    assert general.tls_verify == "verify_full"
    assert general.mirror_exposure == 0.5
    assert general.node_id == 3
    assert general.primary_functions == ["nextval", "setval"]


@pytest.mark.parametrize(
    "var, value, message",
    [
        ("PGHERD_PORT", "abc", 'environment: PGHERD_PORT: expected an integer, found "abc"'),
        (
            "PGDOG_PORT",
            "99999",
            'environment: PGDOG_PORT: expected an integer from 0 to 65535, found "99999"',
        ),
        (
            "PGHERD_DRY_RUN",
            "maybe",
            'environment: PGHERD_DRY_RUN: expected true or false, found "maybe"',
        ),
        (
            "PGHERD_POOLER_MODE",
            "pipeline",
            'environment: PGHERD_POOLER_MODE: expected one of "transaction", "session", "statement", '
            'found "pipeline"',
        ),
    ],
)
def test_bad_env_value_names_the_variable(files, var, value, message):
    files()
    assert errors_of(env={var: value}) == [message]


def test_env_keys_count_as_set(files):
    files()
    config = load_config(env={"PGHERD_LISTEN_BACKLOG": "1000"})
    assert "general.listen_backlog" in config.unsupported_keys()


def test_os_environ_is_the_default(files, monkeypatch):
    files()
    monkeypatch.setenv("PGHERD_PORT", "6543")
    assert load_config().general.port == 6543


# ----- -d URLs -------------------------------------------------------------------------


def test_urls_replace_databases_and_add_users(files):
    files(
        pgherd=ONE_DB + '[[databases]]\nname = "old"\nhost = "h"\n',
        users=ONE_USER + '[[users]]\nname = "x"\ndatabase = "old"\npassword = "y"\n',
    )
    config = load(
        database_urls=[
            "postgres://us%40er:p%3Ass%2Fw@db1:5433/shop",
            "postgresql://us%40er:p%3Ass%2Fw@db2/shop?role=replica",
        ]
    )
    assert [(db.name, db.host, db.port, db.role) for db in config.databases] == [
        ("shop", "db1", 5433, "primary"),
        ("shop", "db2", 5432, "replica"),
    ]
    added = config.find_user("us@er", "shop")
    assert (added.password, added.database) == ("p:ss/w", "shop")
    assert config.find_user("app", "prod") is not None  # users.toml users stay
    assert describe(config).count('\ndatabase "shop"\n  shard 0\n') == 1


@pytest.mark.parametrize(
    "url, message",
    [
        ("mysql://a:b@h/d", "-d mysql://a:***@h/d: expected a postgres:// or postgresql:// URL"),
        ("postgres://a:b@h:port/d", "-d postgres://a:***@h:port/d: not a valid URL"),
        (
            "postgres://a:b@h/d?rol=replica",
            '-d postgres://a:***@h/d?rol=replica: unknown parameter "rol"; did you mean "role"?',
        ),
        (
            "postgres://a:b@h/d?shard=x",
            '-d postgres://a:***@h/d?shard=x: parameter shard: expected an integer, found "x"',
        ),
    ],
)
def test_bad_url(files, url, message):
    files(pgherd=None, users=None)
    (error,) = errors_of(database_urls=[url])
    assert error.startswith(message)
    assert ":b@" not in error


def test_url_without_password_needs_trust(files):
    files(pgherd=None, users=None)
    (error,) = errors_of(database_urls=["postgres://a@h/d"])
    assert error.startswith('-d postgres://a@h/d: user "a" (database "d") has no password')
    assert load(database_urls=["postgres://a@h/d"], env={"PGHERD_AUTH_TYPE": "trust"}).users


# ----- defaults and precedence ---------------------------------------------------------


def test_defaults_match_pgdog(files):
    files()
    general = load().general
    assert general.host == "0.0.0.0"
    assert general.port == 6432
    assert general.default_pool_size == 10
    assert general.min_pool_size == 1
    assert general.pooler_mode == "transaction"
    assert general.checkout_timeout == 5_000
    assert general.connect_timeout == 5_000
    assert general.connect_attempts == 1
    assert general.connect_attempt_delay == 0
    assert general.idle_timeout == 60_000
    assert general.server_lifetime == 86_400_000
    assert general.ban_timeout == 300_000
    assert general.healthcheck_interval == 30_000
    assert general.idle_healthcheck_interval == 30_000
    assert general.idle_healthcheck_delay == 5_000
    assert general.healthcheck_timeout == 5_000
    assert general.rollback_timeout == 5_000
    assert general.shutdown_timeout == 60_000
    assert general.client_login_timeout == 60_000
    assert general.auth_type == "scram"
    assert general.prepared_statements == "extended"
    assert general.load_balancing_strategy == "random"
    assert general.read_write_split == "include_primary"
    assert general.tls_verify == "prefer"
    assert general.mirror_queue == 128
    assert general.openmetrics_host == "0.0.0.0"
    database = load().databases[0]
    assert (database.port, database.role, database.shard) == (5432, "primary", 0)


def test_pgherd_extension_defaults(files):
    files()
    general = load().general
    assert general.max_message_size == 64 * 1024 * 1024
    assert general.node_id is None


def test_workers_default_to_cpu_count(files):
    files()
    config = load()
    assert config.general.workers == os.cpu_count()
    assert config.worker_count() == os.cpu_count()


def test_pgdog_alias_max_pool_size(files):
    files(pgherd=ONE_DB + "[general]\nmax_pool_size = 42\n")
    assert load().general.default_pool_size == 42


PRECEDENCE_DB = """
[general]
default_pool_size = 10
min_pool_size = 1
pooler_mode = "transaction"
idle_timeout = 60000
server_lifetime = 1000

[[databases]]
name = "prod"
host = "h0"
pool_size = 20
pooler_mode = "session"
idle_timeout = 5000

[[databases]]
name = "prod"
host = "h1"
shard = 1

[[databases]]
name = "prod"
host = "h0r"
role = "replica"

[[databases]]
name = "misc"
host = "m"
"""

PRECEDENCE_USERS = """
[[users]]
name = "app"
database = "prod"
password = "x"
pool_size = 30
min_pool_size = 3

[[users]]
name = "app"
databases = ["misc"]
password = "y"
server_lifetime = 2000
pooler_mode = "statement"
"""


def test_precedence_users_over_databases_over_general(files):
    files(pgherd=PRECEDENCE_DB, users=PRECEDENCE_USERS)
    config = load()
    app, db0 = config.find_user("app", "prod"), config.database_hosts("prod")[0]
    assert config.pool_size(app, db0) == 30  # user wins
    assert config.min_pool_size(app, db0) == 3
    assert config.pooler_mode(app, db0) == "session"  # database wins over general
    assert config.idle_timeout(app, db0) == 5000
    assert config.server_lifetime(app, db0) == 1000  # general
    misc_user, misc_db = config.find_user("app", "misc"), config.database_hosts("misc")[0]
    assert misc_user.password == "y"
    assert config.pool_size(misc_user, misc_db) == 10
    assert config.pooler_mode(misc_user, misc_db) == "statement"
    assert config.server_lifetime(misc_user, misc_db) == 2000
    assert config.find_user("nobody", "prod") is None


def test_database_hosts_are_ordered_by_shard_then_config_order(files):
    files(pgherd=PRECEDENCE_DB, users=PRECEDENCE_USERS)
    config = load()
    assert [db.host for db in config.database_hosts("prod")] == ["h0", "h0r", "h1"]
    assert config.database_names() == ["prod", "misc"]
    assert [[db.host for db in shard] for shard in config.shards("prod")] == [["h0", "h0r"], ["h1"]]


def test_server_login_prefers_database_then_user_settings(files):
    files(
        pgherd='[[databases]]\nname = "prod"\nhost = "h"\nuser = "dbuser"\n',
        users=ONE_USER + 'server_user = "srv"\nserver_password = "srvpw"\n',
    )
    config = load()
    user, db = config.users[0], config.databases[0]
    assert config.server_login(user, db) == ("dbuser", "srvpw")


# ----- unsupported keys, describe, examples --------------------------------------------


def test_unsupported_keys_lists_set_keys_not_acted_on(files):
    files(
        pgherd=ONE_DB + "read_only = true\n[general]\nport = 7000\nlisten_backlog = 1\n"
        '[tcp]\nkeepalive = false\n[vault]\naddress = "http://v"\n',
        users=ONE_USER + "statement_timeout = 5\n",
    )
    assert load().unsupported_keys() == [
        "databases.read_only",
        "general.listen_backlog",
        "tcp.keepalive",
        "users.statement_timeout",
        "vault.address",
    ]


def test_full_pgdog_example_loads():
    config = load(config_path=EXAMPLES / "pgdog.toml", users_path=EXAMPLES / "users.toml")
    assert [len(hosts) for hosts in config.shards("prod")] == [2, 2]
    assert {db.role for db in config.database_hosts("prod")} == {"primary", "replica"}
    tenants = next(t for t in config.sharded_tables if t.name == "tenants")
    assert [rule.kind for rule in tenants.mapping] == ["list", "list", "default"]
    invoices = next(t for t in config.sharded_tables if t.name == "invoices")
    assert [rule.kind for rule in invoices.mapping] == ["range", "range"]
    assert config.sharded_mappings and config.sharded_schemas and config.omnisharded_tables
    assert config.rewrite.enabled and config.admin.password == "change-me"
    assert config.tcp.retries == 3


def test_minimal_example_loads():
    config = load(config_path=EXAMPLES / "pgherd.toml", users_path=EXAMPLES / "users-minimal.toml")
    assert config.database_names() == ["app"]
    assert config.unsupported_keys() == []


def test_describe_shows_topology_and_hides_passwords():
    config = load(config_path=EXAMPLES / "pgdog.toml", users_path=EXAMPLES / "users.toml")
    text = describe(config)
    assert (
        'database "prod"\n  shard 0\n    primary  10.0.0.1:5432 (database_name=prod_shard_0)\n'
        in text
    )
    assert "    replica  10.0.1.2:5432 (database_name=prod_shard_1)" in text
    assert (
        'user "app" database "prod": pool_size 25, min_pool_size 2, pooler_mode transaction' in text
    )
    assert "tenants.country" in text and "invoices.number" in text
    assert 'schema "tenant_a" -> shard 0' in text
    assert "countries, currencies" in text
    assert "general.mirror_queue" in text  # set but not acted on (mirroring comes later)
    for secret in (
        "app-secret",
        "batch-secret",
        "analyst-secret",
        "reporting-secret",
        "change-me",
        SCRAM_VERIFIER,
    ):
        assert secret not in text


def test_config_survives_a_dump_and_validate_round_trip():
    config = load(config_path=EXAMPLES / "pgdog.toml", users_path=EXAMPLES / "users.toml")
    copy = Config.model_validate(config.model_dump(mode="json", exclude_unset=True))
    assert copy == config
    assert copy.unsupported_keys() == config.unsupported_keys()


def test_config_error_lists_one_problem_per_line():
    error = ConfigError(["a: one", "b: two"])
    assert error.errors == ["a: one", "b: two"]
    assert str(error) == "a: one\nb: two"


# ----- docs stay honest ----------------------------------------------------------------


def test_docs_mention_every_acted_on_key():
    text = DOCS.read_text()
    missing = [key for key in sorted(ACTED_ON) if f"`{key}`" not in text]
    assert missing == []


def test_docs_list_every_modeled_key():
    text = DOCS.read_text()
    missing = [key for key, _, _ in all_keys() if f"`{key}`" not in text]
    assert missing == []


def test_a_broken_users_toml_causes_no_follow_on_errors(files):
    files(users="[[users]\n")
    (error,) = errors_of()
    assert error.startswith("users.toml: line 1, column")
