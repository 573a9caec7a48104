"""Route decisions per second: short and long statements, cache hit and cache miss.

Times pgherd's router (`pgherd.router.route.Router.route(sql)` over a 2-shard plan) when it can
be built. Otherwise (an older or newer router API) it times what a router does on a miss
(DESIGN.md, "Performance rules"): `pglast.parser.parse_sql_json` + `orjson.loads`, behind a dict
cache for hits; the result says which one it measured and why.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Callable

# Statements are generated in batches outside the timed part, so string formatting is not timed.
BATCH = 500
# The fallback's cache is cleared when it holds this many texts (the miss case makes new ones).
FALLBACK_CACHE_ENTRIES = 100_000

SHORT = "SELECT abalance FROM pgbench_accounts WHERE aid = {n}"
# A long statement that still goes to one shard: every sharded table (those with `aid`) is
# filtered by the key; joins, a CTE, an IN list of 100 values, CASE, GROUP BY, ORDER BY, LIMIT.
LONG = (
    "WITH recent AS (\n"
    "  SELECT h.aid, h.tid, h.bid, sum(h.delta) AS delta, count(*) AS n, max(h.mtime) AS last_seen\n"
    "  FROM pgbench_history h\n"
    "  WHERE h.aid = {n} AND h.mtime > now() - interval '1 day' AND h.bid IN ({inlist})\n"
    "  GROUP BY h.aid, h.tid, h.bid\n"
    "  HAVING count(*) > 0\n"
    ")\n"
    "SELECT a.aid, a.abalance, t.tid, t.tbalance, b.bid, b.bbalance, r.delta, r.n,\n"
    "       CASE WHEN a.abalance > 0 THEN 'credit' WHEN a.abalance < 0 THEN 'debit' ELSE 'zero' END AS kind,\n"
    "       coalesce(r.last_seen, '-infinity'::timestamp) AS last_seen,\n"
    "       (SELECT max(t2.tbalance) FROM pgbench_tellers t2 WHERE t2.bid = a.bid) AS best_teller\n"
    "FROM pgbench_accounts a\n"
    "JOIN recent r ON r.aid = a.aid\n"
    "JOIN pgbench_tellers t ON t.tid = r.tid\n"
    "LEFT JOIN pgbench_branches b ON b.bid = a.bid\n"
    "WHERE a.aid = {n} AND a.abalance BETWEEN -5000 AND 5000 AND a.filler IS NOT NULL\n"
    "  AND a.bid = ANY (ARRAY[1, 2, 3, 4, 5, 6, 7, 8, 9, 10])\n"
    "ORDER BY r.delta DESC NULLS LAST, t.tid\n"
    "LIMIT 50"
)
_INLIST = ", ".join(str(i) for i in range(1, 101))


def statement(kind: str, n: int) -> str:
    if kind == "short":
        return SHORT.format(n=n)
    return LONG.format(n=n, inlist=_INLIST)


# The plan the router is timed with: two shards, every table with an `aid` column sharded by it
# (pgbench_accounts, pgbench_history), so the short statement routes to one shard.
ROUTER_CONFIG = """\
[general]
host = "127.0.0.1"
port = 6432
[[databases]]
name = "sharded"
host = "127.0.0.1"
database_name = "shard_0"
shard = 0
[[databases]]
name = "sharded"
host = "127.0.0.1"
database_name = "shard_1"
shard = 1
[[sharded_tables]]
database = "sharded"
column = "aid"
data_type = "bigint"
"""
ROUTER_USERS = """\
[[users]]
name = "bench"
password = "bench"
database = "sharded"
"""


def _find_router() -> tuple[Callable[[str], object] | None, str, object]:
    """pgherd's Router for a 2-shard plan, as route(sql); else (None, why not, None)."""
    try:
        from pgherd.config import load_config
        from pgherd.router.plan import ShardingPlan
        from pgherd.router.route import Router
    except ImportError as e:
        return None, f"pgherd.router is not importable ({e})", None
    try:
        with tempfile.TemporaryDirectory(prefix="pgherd-bench-router-") as d:
            config_path, users_path = Path(d) / "pgherd.toml", Path(d) / "users.toml"
            config_path.write_text(ROUTER_CONFIG)
            users_path.write_text(ROUTER_USERS)
            config = load_config(config_path, users_path, env={})
        router = Router(ShardingPlan.from_config(config, "sharded"))
        route = router.route(statement("short", 1))
    except Exception as e:  # the router's API moved on: say so and time the fallback
        return None, f"pgherd.router did not work as the bench expects ({type(e).__name__}: {e})", None
    return router.route, f"first route: kind={getattr(route, 'kind', '?')} shards={getattr(route, 'shards', '?')}", router


def _parse_only() -> Callable[[str], object]:
    import orjson
    from pglast.parser import parse_sql_json

    return lambda sql: orjson.loads(parse_sql_json(sql))


def _fallback() -> Callable[[str], object]:
    """Parse and keep the statement kinds, behind a dict cache keyed by the text (bounded by entries)."""
    import orjson
    from pglast.parser import parse_sql_json

    def parse(sql: str) -> object:
        # What a route decision needs from the tree is small (statement kinds, tables, keys): keep
        # that, not the tree. Caching whole trees makes every later GC pass walk them (3x slower).
        tree = orjson.loads(parse_sql_json(sql))
        return tuple(next(iter(s["stmt"])) for s in tree.get("stmts", ()))

    cache: dict[str, object] = {}

    def cached(sql: str) -> object:
        tree = cache.get(sql)
        if tree is None:
            if len(cache) >= FALLBACK_CACHE_ENTRIES:
                cache.clear()
            tree = cache[sql] = parse(sql)
        return tree

    return cached


def _time(fn: Callable[[str], object], texts: Callable[[int], list[str]], seconds: float) -> dict:
    """Call fn over batches of texts until `seconds` of timed calls have passed."""
    calls = 0
    spent = 0.0
    batch_no = 0
    while spent < seconds:
        batch = texts(batch_no)
        batch_no += 1
        t0 = time.perf_counter()
        for sql in batch:
            fn(sql)
        spent += time.perf_counter() - t0
        calls += len(batch)
    return {"calls": calls, "seconds": round(spent, 4), "per_second": calls / spent, "us_per_call": spent / calls * 1e6}


def _describe(decision: object) -> str:
    """What the router decided, in a few words (a Route's kind, shards, refusal)."""
    if not hasattr(decision, "kind"):
        return "statement kinds " + repr(decision)
    text = f"{decision.kind} to shards {getattr(decision, 'shards', '?')}"
    if getattr(decision, "cross_shard", False):
        text += " (cross-shard)"
    if getattr(decision, "refuse", None):
        text += f"; refused: {decision.refuse}"
    return text


def run(seconds_per_case: float) -> dict:
    router, source, router_obj = _find_router()
    if router is not None:
        implementation = "pgherd.router Router.route(sql), 2-shard plan sharded by aid, own route cache"
        fn = router
    else:
        implementation = ("fallback: pglast.parser.parse_sql_json + orjson.loads, result cached in a dict by text; "
                          + source)
        fn = _fallback()
    parse_only = _parse_only()
    print(f"parser microbenchmark: {implementation}", flush=True)
    cases = {}
    counter = [10_000_000]  # distinct literals, so every miss text is new to any cache

    for kind in ("short", "long"):
        hit_text = statement(kind, 42)
        decision = fn(hit_text)  # primes the cache

        def hits(_: int, t: str = hit_text) -> list[str]:
            return [t] * BATCH

        def misses(_: int, k: str = kind) -> list[str]:
            start = counter[0]
            counter[0] += BATCH
            return [statement(k, n) for n in range(start, start + BATCH)]

        runs = [("hit", fn, hits, _describe(decision)), ("miss", fn, misses, _describe(decision))]
        if router is not None:  # the bare parse, for scale: what a miss costs before any analysis
            runs.append(("parse only", parse_only, misses, "pglast.parser.parse_sql_json + orjson.loads"))
        for case, f, texts, what in runs:
            result = _time(f, texts, seconds_per_case)
            result["statement_bytes"] = len(hit_text.encode())
            result["decision"] = what
            cases[f"{kind}/{case}"] = result
            print(f"  {kind:>5} statement ({len(hit_text)} bytes), {case:<10}: "
                  f"{result['per_second']:>12,.0f} per second  {result['us_per_call']:8.2f} µs", flush=True)
    result = {"implementation": implementation, "router_available": router is not None, "detail": source,
              "cases": cases}
    stats = getattr(router_obj, "stats", None)
    if callable(stats):
        try:
            result["router_cache"] = stats()._asdict()
        except Exception:
            pass
    return result
