"""Read/write classification of query texts for the load balancer: primary or any replica.

    rw = ReadWriteClassifier("conservative")      # once per worker (owns the cache)
    facts = rw.classify(sql)                      # per Query text; cached, bounded by bytes

A statement is a *write* when it must run on the primary: it changes data or schema, takes row or
table locks, assigns a transaction id, or would fail on a hot standby (PostgreSQL docs, "Hot
Standby", "Query Access": LISTEN, NOTIFY, two-phase commit, nextval, pg_current_wal_lsn...). The
rules, from the raw parse tree (src/include/nodes/parsenodes.h; JSON form, see parse.py):

- reads: SELECT / VALUES / TABLE without FOR UPDATE|NO KEY UPDATE|SHARE|KEY SHARE (anywhere, also in
  subqueries), without a data-modifying WITH and without INTO; SHOW; EXPLAIN without ANALYZE (it
  plans, never executes); EXPLAIN ANALYZE of a read; COPY t TO and COPY (SELECT ...) TO; DECLARE
  of a read cursor, FETCH, MOVE, CLOSE; transaction control (BEGIN, COMMIT, SAVEPOINT...); SET,
  RESET, SET CONSTRAINTS; DISCARD; UNLISTEN (a no-op on a standby); LOAD;
- writes: everything else -- INSERT, UPDATE, DELETE, MERGE, COPY FROM, DDL, SELECT INTO, CALL, DO,
  LOCK, LISTEN, NOTIFY, VACUUM, ANALYZE, CHECKPOINT, PREPARE TRANSACTION / COMMIT PREPARED /
  ROLLBACK PREPARED (prepared transactions live on the primary), SQL-level PREPARE / EXECUTE /
  DEALLOCATE (EXECUTE's statement is unknown here, and the prepared statement must live where
  EXECUTE runs), and any text that does not parse (safe: the primary can run anything);
- function calls inside a read: WRITE_FUNCTIONS (nextval, advisory locks, large objects, ...) make
  it a write under both strategies, since they fail or misbehave on a standby; under
  "conservative" so does any other function not known to be read-only (READ_ONLY_FUNCTIONS, plus
  names given to add_read_only); under "aggressive" other functions do not matter. A name
  qualified with pg_catalog is the built-in of that name; any other schema means a user function.

A query text with several statements is a write if any of them is. The transaction facts (begin,
tx_end, set_tx_read_only) describe how the text starts; set_role and session_read_only are the
last such change in the text (its effect once it has run). These facts are "reads": they do not
pick a host by themselves, the caller's transaction logic does.
"""

from __future__ import annotations

import re
from typing import Iterable, NamedTuple, Optional

import orjson
from pglast.parser import parse_sql_json

from .analyze import AGGREGATES
from .comments import manual_hints
from .parse import ByteLRU, ParseError, text_bytes

__all__ = ["RW", "ReadWriteClassifier", "READ_ONLY_FUNCTIONS", "RW_CACHE_BYTES", "STRATEGIES", "WRITE_FUNCTIONS"]

# Cache budget per worker. An entry is the query text plus a fixed overhead (results are shared),
# so 4 MiB holds about 12,000 statements of 100 characters: more distinct texts than applications
# send, and small next to the route cache (router/route.py) and connection buffers.
RW_CACHE_BYTES = 4 * 1024 * 1024
# Do not cache a text whose entry would take more than this share of the cache: giant texts (bulk
# INSERTs with inline values) are usually unique and would evict the statements that repeat.
RW_MAX_ENTRY_FRACTION = 64
# What an entry keeps alive beyond its text: the LRU's OrderedDict slot and link, its (value, size)
# tuple and the size int -- about 160 bytes measured with tracemalloc over 20,000 entries, rounded up
# for the dict's spare slots; the result itself is interned and shared.
RW_ENTRY_OVERHEAD_BYTES = 192
# Distinct results kept for sharing between entries. Almost every text gives one of a handful of
# results; the bound only stops odd SET pgherd.role values from growing the table forever.
_INTERN_MAX = 256

STRATEGIES = ("conservative", "aggressive")

# Values of pgherd.role / pgdog.role; set_role reports other values as given (lower case) for the
# caller to refuse (SQLSTATE 22023).
ROLE_VALUES = frozenset(("primary", "replica", "auto"))
_ROLE_VARIABLES = frozenset(("pgherd.role", "pgdog.role"))

# Built-in functions (in pg_catalog) that never write, take no lock that matters beyond the
# statement, assign no transaction id and work on a hot standby. Generous for plainly read-only
# functions; nothing that changes state (set_config, setseed), locks (pg_advisory_*), or fails
# during recovery (pg_current_wal_lsn, pg_walfile_name). Functions the grammar produces for SQL
# syntax appear here too: EXTRACT -> extract, TRIM -> btrim, x AT TIME ZONE -> timezone, COLLATION
# FOR -> pg_collation_for. COALESCE, NULLIF, GREATEST, LEAST, CURRENT_DATE, CURRENT_USER and the
# like are not function calls in the raw parse tree at all.
READ_ONLY_FUNCTIONS = AGGREGATES | frozenset("""
    rank dense_rank percent_rank cume_dist row_number ntile lag lead first_value last_value nth_value

    abs cbrt ceil ceiling degrees div exp factorial floor gcd lcm ln log log10 min_scale mod pi
    power pow radians round scale sign sqrt trim_scale trunc width_bucket random random_normal
    acos acosd acosh asin asind asinh atan atan2 atan2d atand atanh cos cosd cosh cot cotd sin sind
    sinh tan tand tanh erf erfc numeric_inc

    ascii bit_length bit_count btrim char_length character_length chr concat concat_ws convert
    convert_from convert_to decode encode format initcap left length lower lpad ltrim md5 normalize
    is_normalized octet_length overlay parse_ident position quote_ident quote_literal
    quote_nullable regexp_count regexp_instr regexp_like regexp_match regexp_matches regexp_replace
    regexp_split_to_array regexp_split_to_table regexp_substr repeat replace reverse right rpad
    rtrim split_part starts_with string_to_array string_to_table strpos substr substring to_ascii
    to_hex to_bin to_oct translate unistr upper sha224 sha256 sha384 sha512 get_bit get_byte
    set_bit set_byte like_escape similar_escape similar_to_escape casefold crc32 crc32c
    pg_client_encoding pg_encoding_to_char pg_char_to_encoding

    to_char to_date to_number to_timestamp

    age clock_timestamp date_add date_bin date_part date_subtract date_trunc extract isfinite
    justify_days justify_hours justify_interval make_date make_interval make_time make_timestamp
    make_timestamptz now statement_timestamp timeofday transaction_timestamp timezone overlaps

    enum_first enum_last enum_range

    area center diameter height width radius npoints point box circle polygon lseg path line
    isclosed isopen pclose popen bound_box diagonal slope

    abbrev broadcast family host hostmask inet_merge inet_same_family masklen netmask network
    set_masklen macaddr8_set7bit

    to_tsvector to_tsquery plainto_tsquery phraseto_tsquery websearch_to_tsquery ts_rank ts_rank_cd
    ts_headline ts_lexize ts_debug ts_parse ts_token_type ts_delete ts_filter
    setweight strip array_to_tsvector tsvector_to_array numnode querytree get_current_ts_config

    gen_random_uuid uuidv4 uuidv7 uuid_extract_timestamp uuid_extract_version

    to_json to_jsonb array_to_json row_to_json json_build_array jsonb_build_array json_build_object
    jsonb_build_object json_object jsonb_object json_array_length jsonb_array_length json_each
    jsonb_each json_each_text jsonb_each_text json_extract_path jsonb_extract_path
    json_extract_path_text jsonb_extract_path_text json_object_keys jsonb_object_keys
    json_populate_record jsonb_populate_record jsonb_populate_record_valid json_populate_recordset
    jsonb_populate_recordset json_to_record jsonb_to_record json_to_recordset jsonb_to_recordset
    json_strip_nulls jsonb_strip_nulls jsonb_set jsonb_set_lax jsonb_insert jsonb_pretty
    json_typeof jsonb_typeof json_array_elements jsonb_array_elements json_array_elements_text
    jsonb_array_elements_text jsonb_path_exists jsonb_path_match jsonb_path_query
    jsonb_path_query_array jsonb_path_query_first jsonb_path_exists_tz jsonb_path_match_tz
    jsonb_path_query_tz jsonb_path_query_array_tz jsonb_path_query_first_tz

    array_append array_cat array_dims array_fill array_length array_lower array_ndims
    array_position array_positions array_prepend array_remove array_replace array_reverse
    array_sample array_shuffle array_sort array_to_string array_upper cardinality trim_array
    unnest generate_series generate_subscripts

    isempty lower_inc upper_inc lower_inf upper_inf range_merge multirange int4range int8range
    numrange tsrange tstzrange daterange int4multirange int8multirange nummultirange tsmultirange
    tstzmultirange datemultirange

    num_nonnulls num_nulls

    int2 int4 int8 float4 float8 numeric text bool date time timestamp timestamptz interval cidr
    name oid bpchar varchar macaddr macaddr8

    xpath xpath_exists xml_is_well_formed xml_is_well_formed_document xml_is_well_formed_content
    xmlcomment xmltext

    current_setting current_database current_query current_schema current_schemas current_user
    session_user system_user inet_client_addr inet_client_port inet_server_addr inet_server_port
    pg_backend_pid pg_blocking_pids pg_safe_snapshot_blocking_pids pg_conf_load_time
    pg_postmaster_start_time pg_current_logfile pg_my_temp_schema pg_is_other_temp_schema
    pg_jit_available pg_listening_channels pg_notification_queue_usage pg_trigger_depth version
    pg_sleep pg_sleep_for pg_sleep_until pg_typeof pg_collation_for format_type pg_input_is_valid
    pg_input_error_info pg_column_size pg_column_compression pg_column_toast_chunk_id
    pg_database_size pg_indexes_size pg_relation_size pg_size_bytes pg_size_pretty pg_table_size
    pg_tablespace_size pg_total_relation_size pg_relation_filenode pg_relation_filepath
    pg_filenode_relation pg_partition_tree pg_partition_ancestors pg_partition_root

    has_any_column_privilege has_column_privilege has_database_privilege
    has_foreign_data_wrapper_privilege has_function_privilege has_language_privilege
    has_largeobject_privilege has_parameter_privilege has_schema_privilege has_sequence_privilege
    has_server_privilege has_table_privilege has_tablespace_privilege has_type_privilege
    pg_has_role row_security_active acldefault aclexplode makeaclitem

    pg_collation_is_visible pg_conversion_is_visible pg_function_is_visible pg_opclass_is_visible
    pg_operator_is_visible pg_opfamily_is_visible pg_statistics_obj_is_visible
    pg_table_is_visible pg_ts_config_is_visible pg_ts_dict_is_visible pg_ts_parser_is_visible
    pg_ts_template_is_visible pg_type_is_visible

    pg_get_catalog_foreign_keys pg_get_constraintdef pg_get_expr pg_get_functiondef
    pg_get_function_arguments pg_get_function_identity_arguments pg_get_function_result
    pg_get_function_sqlbody pg_get_indexdef pg_get_keywords pg_get_partkeydef
    pg_get_partition_constraintdef pg_get_ruledef pg_get_serial_sequence pg_get_statisticsobjdef
    pg_get_statisticsobjdef_columns pg_get_statisticsobjdef_expressions pg_get_triggerdef
    pg_get_userbyid pg_get_viewdef pg_index_column_has_property pg_index_has_property
    pg_indexam_has_property pg_options_to_table pg_settings_get_flags pg_tablespace_databases
    pg_tablespace_location pg_get_wal_replay_pause_state pg_get_acl
    to_regclass to_regcollation to_regnamespace to_regoper to_regoperator to_regproc
    to_regprocedure to_regrole to_regtype to_regtypemod obj_description col_description
    shobj_description pg_describe_object pg_identify_object pg_identify_object_as_address
    pg_get_object_address pg_show_all_settings pg_timezone_names pg_timezone_abbrevs

    pg_current_snapshot pg_snapshot_xip pg_snapshot_xmax pg_snapshot_xmin pg_visible_in_snapshot
    pg_xact_status pg_current_xact_id_if_assigned txid_current_if_assigned txid_current_snapshot
    txid_snapshot_xip txid_snapshot_xmax txid_snapshot_xmin txid_visible_in_snapshot txid_status
    pg_xact_commit_timestamp pg_xact_commit_timestamp_origin pg_last_committed_xact mxid_age
    pg_control_checkpoint pg_control_init pg_control_recovery pg_control_system pg_lock_status
    pg_prepared_xact

    pg_is_in_recovery pg_last_wal_receive_lsn pg_last_wal_replay_lsn pg_last_xact_replay_timestamp
    pg_is_wal_replay_paused pg_wal_lsn_diff
""".split())

# Schema-qualified functions that are read-only: pgherd's own (answered or rewritten by pgherd).
READ_ONLY_QUALIFIED = frozenset(("pgherd.unique_id", "pgdog.unique_id"))

# Built-ins that must run on the primary under either strategy: they write or assign a transaction
# id (nextval, setval, txid_current), depend on session state made by such a call (currval,
# lastval), change settings (set_config), take locks that other sessions on the primary must see
# (advisory locks), touch large objects, signal or control the server, fail during recovery
# (checked on a PostgreSQL 16 standby), or run SQL text they are given (query_to_xml).
WRITE_FUNCTIONS = frozenset("""
    nextval setval currval lastval txid_current pg_current_xact_id set_config pg_notify
    pg_terminate_backend pg_cancel_backend pg_reload_conf pg_rotate_logfile pg_switch_wal
    pg_current_wal_lsn pg_current_wal_insert_lsn pg_current_wal_flush_lsn pg_walfile_name
    pg_walfile_name_offset pg_create_restore_point pg_start_backup pg_stop_backup pg_promote
    pg_wal_replay_pause pg_wal_replay_resume pg_log_backend_memory_contexts
    pg_import_system_collations pg_replication_slot_advance pg_sync_replication_slots
    pg_log_standby_snapshot pg_nextoid pg_extension_config_dump gin_clean_pending_list loread lowrite
    query_to_xml query_to_xmlschema query_to_xml_and_xmlschema
""".split())
# Name prefixes of the same (families too long to list): advisory locks, large objects, dblink,
# replication slots and origins, statistics resets, backups, BRIN summaries, pg_upgrade's helpers.
WRITE_PREFIXES = ("pg_advisory_", "pg_try_advisory_", "lo_", "dblink", "pg_create_", "pg_drop_", "pg_copy_",
                  "pg_replication_origin_", "pg_logical_", "pg_stat_reset", "pg_backup_", "brin_", "binary_upgrade_")

# Statements that are reads whatever they contain (no table data is written or locked).
_READ_STATEMENTS = frozenset(("VariableShowStmt", "VariableSetStmt", "TransactionStmt", "DiscardStmt", "FetchStmt",
                              "ClosePortalStmt", "UnlistenStmt", "ConstraintsSetStmt", "LoadStmt"))
# Transaction statements that are writes: prepared transactions exist only on the primary.
_TX_WRITES = frozenset(("TRANS_STMT_PREPARE", "TRANS_STMT_COMMIT_PREPARED", "TRANS_STMT_ROLLBACK_PREPARED"))
# Keys in a read statement's tree that make it a write: row locks, SELECT INTO, data-modifying WITH.
_WRITE_KEYS = frozenset(("lockingClause", "intoClause", "InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt"))
# A read statement is checked on its compact JSON text rather than by walking the tree (a few us
# against 20 us for a join with a few calls). In that text a `"key":` is always a real key: a quote
# inside a string value is escaped (\"), and a string value is never followed by a colon.
_WRITE_KEY_RE = re.compile(r'"(?:lockingClause|intoClause|InsertStmt|UpdateStmt|DeleteStmt|MergeStmt)":')
_FUNC_MARK = '"FuncCall":'
# funcname is FuncCall's first field (libpg_query writes fields in struct order) and a list of String nodes.
_FUNC_RE = re.compile(r'"FuncCall":\{"funcname":\[((?:\{"String":\{"sval":"(?:[^"\\]|\\.)*"\}\},?)+)\]')
_SVAL_RE = re.compile(r'"sval":"((?:[^"\\]|\\.)*)"')

_TRUE = frozenset(("on", "true", "yes", "1", "t", "y"))
_FALSE = frozenset(("off", "false", "no", "0", "f", "n"))


class RW(NamedTuple):
    """What a query text needs from the load balancer. Shared and cached: treat as read-only.

    write              must go to a primary
    begin              "rw" | "ro" when the (first) statement starts a transaction block
    tx_end             the text is one COMMIT/END/ROLLBACK/ABORT (not AND CHAIN)
    set_tx_read_only   SET TRANSACTION READ ONLY (or SET transaction_read_only = on) first, or right
                       after the BEGIN that starts the text
    set_role           "primary" | "replica" | "auto" | "reset" from SET/RESET pgherd.role (pgdog.role),
                       RESET ALL or DISCARD ALL; another value as given (lower case) for the caller to refuse
    role               "primary" | "replica" from a /* pgherd_role: ... */ (pgdog_role) comment
    statements         number of statements in the text (0 for an empty query)
    session_read_only  True / False from SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY / READ
                       WRITE or SET default_transaction_read_only; False from RESET of it, RESET ALL,
                       DISCARD ALL; None when the text does not touch it
    """

    write: bool
    begin: Optional[str] = None
    tx_end: bool = False
    set_tx_read_only: bool = False
    set_role: Optional[str] = None
    role: Optional[str] = None
    statements: int = 1
    session_read_only: Optional[bool] = None


class _Text:
    """Facts gathered while classifying one query text."""

    __slots__ = ("write", "depends", "set_role", "session_read_only")

    def __init__(self) -> None:
        self.write = False
        self.depends = False  # some function was unknown: add_read_only may change the answer
        self.set_role: Optional[str] = None
        self.session_read_only: Optional[bool] = None


class ReadWriteClassifier:
    """Classifies query texts as reads or writes (see module docstring). One per worker."""

    def __init__(self, strategy: str = "conservative", cache_bytes: int = RW_CACHE_BYTES) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"read_write_strategy must be one of {', '.join(STRATEGIES)}, not {strategy!r}")
        self.strategy = strategy
        self.conservative = strategy == "conservative"
        self.extra: set[str] = set()  # add_read_only names: "name" or "schema.name", as in pg_proc
        # text -> (RW, depends on functions); the tuples are interned (see _INTERN_MAX).
        self.cache: ByteLRU[str, tuple[RW, bool]] = ByteLRU(cache_bytes, cache_bytes // RW_MAX_ENTRY_FRACTION)
        self._interned: dict[tuple[RW, bool], tuple[RW, bool]] = {}

    def classify(self, sql: str) -> RW:
        """The RW facts of a query text (cached)."""
        entry = self.cache.get(sql)
        if entry is not None:
            return entry[0]
        entry = self._classify(sql)
        if len(self._interned) < _INTERN_MAX:
            entry = self._interned.setdefault(entry, entry)
        self.cache.put(sql, entry, text_bytes(sql) + RW_ENTRY_OVERHEAD_BYTES)
        return entry[0]

    def add_read_only(self, names: Iterable[str]) -> None:
        """Treat these functions as read-only too ("name", or "schema.name" for qualified calls;
        exact identifiers as in pg_proc). WRITE_FUNCTIONS stay writes. Drops the cached results
        that an unknown function made writes."""
        new = {names} if isinstance(names, str) else set(names)
        new -= self.extra
        if not new:
            return
        self.extra |= new
        kept = [(sql, entry) for sql, entry in self.cache.items() if not entry[1]]
        self.cache.clear()
        for sql, entry in kept:  # least recently used first, so the order survives
            self.cache.put(sql, entry, text_bytes(sql) + RW_ENTRY_OVERHEAD_BYTES)

    # -- one text ---------------------------------------------------------------------------------

    def _classify(self, sql: str) -> tuple[RW, bool]:
        role = manual_hints(sql).role
        try:
            js = parse_sql_json(sql)
        except ParseError:
            return RW(True, role=role), False
        stmts = [s["stmt"] for s in orjson.loads(js)["stmts"] if "stmt" in s]
        if not stmts:
            return RW(False, role=role, statements=0), False
        # The JSON a read is checked on: the whole text's when it is one statement (the parts of
        # EXPLAIN, DECLARE and COPY around their query hold no function call or write key); for
        # several, "" when the text holds neither at all, else None: each read's own, dumped again.
        if len(stmts) == 1:
            src: Optional[str] = js
        elif _FUNC_MARK not in js and _WRITE_KEY_RE.search(js) is None:
            src = ""
        else:
            src = None
        text = _Text()
        for stmt in stmts:
            if self._statement(stmt, src, text):
                text.write = True
        begin, tx_end, tx_ro = _transaction_start(stmts)
        rw = RW(text.write, begin, tx_end, tx_ro, text.set_role, role, len(stmts), text.session_read_only)
        return rw, text.depends

    def _statement(self, stmt: dict, src: Optional[str], text: _Text) -> bool:
        """Whether one top-level statement is a write; notes session facts in text."""
        tag, body = next(iter(stmt.items()))
        if tag in _READ_STATEMENTS:
            if tag == "VariableSetStmt":
                _note_set(body, text)
            elif tag == "DiscardStmt" and body.get("target") == "DISCARD_ALL":
                text.set_role, text.session_read_only = "reset", False
            elif tag == "TransactionStmt":
                return body.get("kind") in _TX_WRITES
            return False
        return self._query(tag, body, src, text)

    def _query(self, tag: str, body: dict, src: Optional[str], text: _Text) -> bool:
        """Whether a data statement (or one nested in EXPLAIN, DECLARE, COPY) is a write."""
        if tag == "SelectStmt":
            if "intoClause" in body:
                return True
            if src == "":
                return False
            return self._read_calls(orjson.dumps(body).decode() if src is None else src, body, text)
        if tag == "ExplainStmt":
            if not any(_is_analyze(o) for o in body.get("options", ())):
                return False  # plans only: nothing runs
            inner_tag, inner = next(iter(body["query"].items()))
            return self._query(inner_tag, inner, src, text)
        if tag == "CopyStmt":
            if body.get("is_from"):
                return True
            if "query" in body:  # COPY (SELECT ...) TO, or COPY (UPDATE ... RETURNING) TO
                inner_tag, inner = next(iter(body["query"].items()))
                return self._query(inner_tag, inner, src, text)
            return False
        if tag == "DeclareCursorStmt":
            inner_tag, inner = next(iter(body["query"].items()))
            return self._query(inner_tag, inner, src, text)
        if tag in _READ_STATEMENTS:
            return False
        return True

    def _read_calls(self, src: str, body: dict, text: _Text) -> bool:
        """Whether a read statement (src: its JSON text) holds a write construct or a function that
        makes it a write."""
        if _WRITE_KEY_RE.search(src) is not None:
            return True
        count = src.count(_FUNC_MARK)
        if not count:
            return False
        found = _FUNC_RE.findall(src)
        if len(found) != count:  # a shape this scanner does not expect: walk the tree instead
            return self._walk(body, text)
        return self._calls([[_unescape(p) for p in _SVAL_RE.findall(names)] for names in found], text)

    def _walk(self, body: dict, text: _Text) -> bool:
        """_read_calls on the tree itself (slower; the fallback)."""
        calls: list[list] = []
        if _collect(body, calls):
            return True
        return self._calls([[p.get("String", {}).get("sval", "") for p in funcname] for funcname in calls], text)

    def _calls(self, calls: list[list[str]], text: _Text) -> bool:
        """Whether these function calls (name parts) make a read a write."""
        write = False
        for parts in calls:
            verdict = self._function(parts)
            if verdict is None:
                text.depends = True
                write = True
            elif verdict:
                return True
        return write

    def _function(self, parts: list[str]) -> Optional[bool]:
        """True: a write; False: read-only; None: unknown under "conservative" (a write for now)."""
        if len(parts) == 1 or (len(parts) == 2 and parts[0] == "pg_catalog"):
            name = parts[-1]
            if name in WRITE_FUNCTIONS or name.startswith(WRITE_PREFIXES):
                return True
            if not self.conservative or name in READ_ONLY_FUNCTIONS or name in self.extra:
                return False
            if len(parts) == 2 and "pg_catalog." + name in self.extra:
                return False
            return None
        qualified = ".".join(parts)
        if not self.conservative or qualified in READ_ONLY_QUALIFIED or qualified in self.extra:
            return False
        return None


def _unescape(raw: str) -> str:
    """A JSON string's content as text (identifiers with backslashes or quotes are rare)."""
    return orjson.loads('"' + raw + '"') if "\\" in raw else raw


def _collect(node: object, calls: list) -> bool:
    """Appends the funcname of every FuncCall under node to calls; True at a write construct."""
    if type(node) is dict:
        for key, value in node.items():
            if key in _WRITE_KEYS:
                return True
            if key == "FuncCall":
                calls.append(value.get("funcname", ()))
            if (type(value) is dict or type(value) is list) and _collect(value, calls):
                return True
    elif type(node) is list:
        for item in node:
            if (type(item) is dict or type(item) is list) and _collect(item, calls):
                return True
    return False


def _transaction_start(stmts: list[dict]) -> tuple[Optional[str], bool, bool]:
    """(begin, tx_end, set_tx_read_only) from the first statement (and the one after a BEGIN)."""
    tag, body = next(iter(stmts[0].items()))
    if tag == "VariableSetStmt":
        return None, False, _sets_tx_read_only(body)
    if tag != "TransactionStmt":
        return None, False, False
    kind = body.get("kind", "TRANS_STMT_BEGIN")
    if kind in ("TRANS_STMT_BEGIN", "TRANS_STMT_START"):
        begin = "rw"
        for option in body.get("options", ()):
            d = option.get("DefElem", {})
            if d.get("defname") == "transaction_read_only":
                begin = "ro" if _int_arg(d.get("arg")) else "rw"
        tx_ro = False
        if len(stmts) > 1:
            tag2, body2 = next(iter(stmts[1].items()))
            tx_ro = tag2 == "VariableSetStmt" and _sets_tx_read_only(body2)
        return begin, False, tx_ro
    if kind in ("TRANS_STMT_COMMIT", "TRANS_STMT_ROLLBACK"):
        return None, len(stmts) == 1 and not body.get("chain"), False
    return None, False, False


def _sets_tx_read_only(body: dict) -> bool:
    """SET TRANSACTION READ ONLY, or SET [LOCAL] transaction_read_only = on."""
    kind, name = body.get("kind"), body.get("name") or ""
    if kind == "VAR_SET_MULTI" and name == "TRANSACTION":
        return _multi_read_only(body) is True
    if kind == "VAR_SET_VALUE" and name.lower() == "transaction_read_only":
        return _bool_arg(body) is True
    return False


def _note_set(body: dict, text: _Text) -> None:
    """Records SET/RESET of pgherd.role and of the session's default read-only mode."""
    kind, name = body.get("kind"), (body.get("name") or "")
    if kind == "VAR_RESET_ALL":
        text.set_role, text.session_read_only = "reset", False
        return
    if kind == "VAR_SET_MULTI":
        if name == "SESSION CHARACTERISTICS":
            ro = _multi_read_only(body)
            if ro is not None:
                text.session_read_only = ro
        return
    low = name.lower()
    if low in _ROLE_VARIABLES:
        if kind in ("VAR_RESET", "VAR_SET_DEFAULT"):
            text.set_role = "reset"
        elif kind == "VAR_SET_VALUE":
            args = body.get("args", ())
            value = _const_arg(args[0]) if len(args) == 1 else None
            text.set_role = (value or "").strip().lower()
    elif low == "default_transaction_read_only" and not body.get("is_local"):
        if kind in ("VAR_RESET", "VAR_SET_DEFAULT"):
            text.session_read_only = False
        elif kind == "VAR_SET_VALUE":
            ro = _bool_arg(body)
            if ro is not None:
                text.session_read_only = ro


def _multi_read_only(body: dict) -> Optional[bool]:
    """READ ONLY (True) / READ WRITE (False) in SET TRANSACTION / SESSION CHARACTERISTICS; else None."""
    found = None
    for arg in body.get("args", ()):
        d = arg.get("DefElem", {})
        if d.get("defname") == "transaction_read_only":
            found = bool(_int_arg(d.get("arg")))
    return found


def _bool_arg(body: dict) -> Optional[bool]:
    """The boolean value of a one-argument SET, or None if it is not one (PostgreSQL's parse_bool)."""
    args = body.get("args", ())
    value = _const_arg(args[0]) if len(args) == 1 else None
    if value is None:
        return None
    value = value.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    return None


def _const_arg(node: dict) -> Optional[str]:
    """The text of a constant argument (string, number or identifier), else None."""
    const = node.get("A_Const")
    if const is None:
        cast = node.get("TypeCast")
        return None if cast is None else _const_arg(cast.get("arg", {}))
    if "sval" in const:
        return const["sval"].get("sval", "")
    if "ival" in const:
        return str(const["ival"].get("ival", 0))
    if "boolval" in const:
        return "true" if const["boolval"].get("boolval") else "false"
    return None


def _int_arg(node: Optional[dict]) -> int:
    """The integer in a DefElem argument like {"A_Const": {"ival": {"ival": 1}}} (0 is omitted)."""
    if not node:
        return 0
    return int(node.get("A_Const", {}).get("ival", {}).get("ival", 0))


def _is_analyze(option: dict) -> bool:
    """EXPLAIN's ANALYZE option, on unless given a false value (ANALYZE false / off / 0)."""
    d = option.get("DefElem", {})
    if d.get("defname") != "analyze":
        return False
    arg = d.get("arg")
    if arg is None:
        return True
    if "String" in arg:
        value = arg["String"].get("sval", "")
    elif "Integer" in arg:
        value = str(arg["Integer"].get("ival", 0))
    else:
        value = _const_arg(arg)
    return value is None or value.strip().lower() not in _FALSE
