"""ShardingPlan: one database's sharding configuration, compiled once per config for fast routing.

Built from the PgDog-compatible sections of pgherd.toml ([[databases]] shard, [[sharded_tables]]
with nested [[sharded_tables.mapping]], the older [[sharded_mappings]], [[sharded_schemas]],
[[omnisharded_tables]], and [general] omnisharded_sticky, system_catalogs, cross_shard_disabled).
A plan is immutable; a config reload builds a new one (and a new Router with an empty cache).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional

from .sharding import KeyFunction

__all__ = ["PlanError", "ShardingPlan", "TableRule", "CATALOG_SCHEMAS"]

# Schemas whose tables are PostgreSQL's own catalogs (the same on every shard, modulo OIDs).
CATALOG_SCHEMAS = frozenset(("pg_catalog", "information_schema"))


class PlanError(ValueError):
    """The sharding configuration cannot be compiled; the message names the section and key."""


class TableRule:
    """One [[sharded_tables]] entry: table (or any table, when name is unset) . column -> function."""

    __slots__ = ("name", "schema", "column", "fn", "label")

    def __init__(self, name: Optional[str], schema: Optional[str], column: str, fn: KeyFunction) -> None:
        self.name, self.schema, self.column, self.fn = name, schema, column, fn
        self.label = ".".join(p for p in (schema, name or "*", column) if p)

    def __repr__(self) -> str:
        return f"TableRule({self.label}, {self.fn!r})"


def _mapping_rules(rules: Iterable[Any]) -> tuple[list, list, Optional[int]]:
    lists, ranges, default = [], [], None
    for rule in rules:
        kind = rule.kind
        if kind == "list":
            lists.append((rule.values or [], rule.shard))
        elif kind == "range":
            ranges.append((rule.start, rule.end, rule.shard))
        elif default is None:
            default = rule.shard
    return lists, ranges, default


def _infer_type(values: Iterable[object]) -> str:
    return "bigint" if all(isinstance(v, int) and not isinstance(v, bool) for v in values) else "varchar"


class ShardingPlan:
    """What the router needs to know about one database; build with from_config().

    Attributes (read-only):
      database, shards, all_mask (bit s set for every shard s)
      trivial          one shard and nothing sharded: the caller need not parse at all
      named            table name -> rules for that table (a table may be listed per schema)
      nameless         column -> rule, for [[sharded_tables]] entries without `name`
      omni             explicitly omnisharded table name -> sticky
      omni_sticky      [general] omnisharded_sticky (implicitly omnisharded tables)
      system_catalogs  "omnisharded_sticky" | "omnisharded" | "sharded"
      schemas          schema name -> shard mask; schema_default: mask for unmapped tables or None
      columns          optional: table -> ordered column names, loaded from the shards by the
                       caller; resolves column-based rules and INSERT without a column list
      common_fn        the one sharding function of every rule (for pgherd_sharding_key), or None
      cross_shard_disabled
    """

    def __init__(
        self,
        database: str,
        shards: int,
        *,
        rules: Iterable[TableRule] = (),
        omni: Mapping[str, bool] | None = None,
        omni_sticky: bool = False,
        system_catalogs: str = "omnisharded_sticky",
        schemas: Mapping[str, int] | None = None,
        schema_default: Optional[int] = None,
        cross_shard_disabled: bool = False,
        columns: Mapping[str, Iterable[str]] | None = None,
    ) -> None:
        self.database = database
        self.shards = max(1, shards)
        self.all_mask = (1 << self.shards) - 1
        self.rules = tuple(rules)
        self.named: dict[str, tuple[TableRule, ...]] = {}
        self.nameless: dict[str, TableRule] = {}
        for rule in self.rules:
            if rule.name:
                self.named[rule.name] = self.named.get(rule.name, ()) + (rule,)
            else:
                self.nameless.setdefault(rule.column, rule)
        self.omni = dict(omni or {})
        self.omni_sticky = omni_sticky
        self.system_catalogs = system_catalogs
        self.schemas = dict(schemas or {})
        self.schema_default = schema_default
        self.cross_shard_disabled = cross_shard_disabled
        self.columns: Optional[dict[str, tuple[str, ...]]] = (
            None if columns is None else {k: tuple(v) for k, v in columns.items()}
        )
        self.has_schemas = bool(self.schemas) or schema_default is not None
        self.trivial = self.shards == 1 and not self.rules and not self.has_schemas
        signatures = {rule.fn.signature for rule in self.rules}
        self.common_fn: Optional[KeyFunction] = self.rules[0].fn if len(signatures) == 1 else None
        # search_path tuple -> mask of its first sharded schema (or None); bounded, see schema_for_path.
        self._path_cache: dict[tuple[str, ...], Optional[int]] = {}

    # -- construction from the config ---------------------------------------------------------

    @classmethod
    def from_config(
        cls, config: Any, database: str, *, columns: Mapping[str, Iterable[str]] | None = None
    ) -> "ShardingPlan":
        """Compile the sharding sections of `config` (a pgherd.config Config) for `database`."""
        shards = max(1, len(config.shards(database)))
        general = config.general
        rules: list[TableRule] = []
        mappings = [m for m in config.sharded_mappings if m.database == database]
        used_mappings: set[int] = set()

        def build(label: str, data_type: str, hasher: str, rule_list: Iterable[Any], **kw: Any) -> KeyFunction:
            lists, ranges, default = _mapping_rules(rule_list)
            try:
                return KeyFunction(data_type, shards, hasher=hasher, lists=lists, ranges=ranges, default=default, **kw)
            except ValueError as e:
                raise PlanError(f"[[sharded_tables]] {label} (database {database!r}): {e}") from None

        for table in config.sharded_tables:
            if table.database != database:
                continue
            own = list(table.mapping or [])
            for i, m in enumerate(mappings):
                if m.column == table.column and m.table in (None, table.name) and m.schema_ in (None, table.schema_):
                    own.append(m)
                    used_mappings.add(i)
            opaque = bool(table.centroids or table.centroids_path or table.lookup_query) or table.data_type == "vector"
            fn = build(table.qualified_name, table.data_type, table.hasher, own,
                       opaque=opaque, broadcast_null=table.broadcast_null)
            rules.append(TableRule(table.name, table.schema_, table.column, fn))

        # [[sharded_mappings]] with no [[sharded_tables]] entry: PgDog needs one for the data type;
        # pgherd infers it from the values (integers -> bigint, else varchar) rather than ignore them.
        orphans: dict[tuple, list[Any]] = {}
        for i, m in enumerate(mappings):
            if i not in used_mappings:
                orphans.setdefault((m.table, m.schema_, m.column), []).append(m)
        for (name, schema, column), ms in orphans.items():
            values = [v for m in ms for v in (m.values or [])]
            values += [v for m in ms for v in (m.start, m.end) if v is not None]
            label = ".".join(p for p in (schema, name or "*", column) if p)
            rules.append(TableRule(name, schema, column, build(label, _infer_type(values), "postgres", ms)))

        omni: dict[str, bool] = {}
        for entry in config.omnisharded_tables:
            if entry.database == database:
                for name in entry.tables:
                    omni[name] = omni.get(name, False) or entry.sticky or general.omnisharded_sticky

        schemas: dict[str, int] = {}
        schema_default: Optional[int] = None
        all_mask = (1 << shards) - 1
        for entry in config.sharded_schemas:
            if entry.database != database:
                continue
            if not entry.all and not 0 <= entry.shard < shards:
                raise PlanError(
                    f"[[sharded_schemas]] {entry.name or '(default)'} (database {database!r}): shard "
                    f"{entry.shard} does not exist; the database has shards 0 to {shards - 1}"
                )
            mask = all_mask if entry.all else 1 << entry.shard
            if entry.name:
                schemas.setdefault(entry.name, mask)
            elif schema_default is None:
                schema_default = mask

        return cls(
            database,
            shards,
            rules=rules,
            omni=omni,
            omni_sticky=general.omnisharded_sticky,
            system_catalogs=general.system_catalogs,
            schemas=schemas,
            schema_default=schema_default,
            cross_shard_disabled=general.cross_shard_disabled,
            columns=columns,
        )

    # -- lookups --------------------------------------------------------------------------------

    def rules_for(self, schema: Optional[str], name: str) -> tuple[TableRule, ...]:
        """Named rules that apply to this table (a rule with a schema needs that schema, or none given)."""
        rules = self.named.get(name)
        if not rules:
            return ()
        return tuple(r for r in rules if r.schema is None or schema is None or r.schema == schema)

    def table_columns(self, schema: Optional[str], name: str) -> Optional[tuple[str, ...]]:
        """Known columns of a table (from the optional catalog), by qualified then bare name."""
        if self.columns is None:
            return None
        if schema:
            cols = self.columns.get(f"{schema}.{name}")
            if cols is not None:
                return cols
        return self.columns.get(name)

    # Distinct search_path values seen are few (set per application); bound the memo anyway.
    _PATH_CACHE_MAX = 1024

    def schema_for_path(self, search_path: Optional[tuple[str, ...]]) -> Optional[int]:
        """Mask of the first sharded schema in search_path (PgDog: unmapped entries are skipped)."""
        if not search_path or not self.schemas:
            return None
        try:
            return self._path_cache[search_path]
        except KeyError:
            pass
        mask = next((self.schemas[s] for s in search_path if s in self.schemas), None)
        if len(self._path_cache) < self._PATH_CACHE_MAX:
            self._path_cache[search_path] = mask
        return mask

    def mask_to_shards(self, mask: int) -> tuple[int, ...]:
        return tuple(s for s in range(self.shards) if mask >> s & 1)

    def __repr__(self) -> str:
        return f"ShardingPlan({self.database!r}, shards={self.shards}, rules={list(self.rules)!r})"
