"""The merge corpus: generated rows and cross-shard SELECTs, shared by the merge tests.

test_merge_oracle.py runs the corpus through router/merge.py directly (shard schemas on one
database); test_cross_shard.py runs it through the real pgherd over shard databases. Both compare
with Postgres over all the rows.

Import it from a test module with `from merge_corpus import ...` after putting this directory on
sys.path (the test modules are imported with --import-mode=importlib, so it is not there already).
"""

from __future__ import annotations

import random
import uuid
from decimal import Decimal
from typing import Any

SEED = 20260509
ROWS = 1500
# The corpus must be at least this large (issue 7: at least 150 cross-shard SELECTs).
MIN_CORPUS = 150

COLUMNS = """
    id bigint primary key, g int, h text, i2 smallint, i4 int, i8 bigint, n numeric, f4 real,
    f8 double precision, t text, vc varchar(20), bc char(4), b bool, d date, ts timestamp,
    tz timestamptz, u uuid, fs double precision, ns numeric
"""
WORDS = ["", "a", "A", "b", "ab", "abc", "Zebra", "zebra", "é", "ß", "日本", "日本語", "😀", "a b", "a\tb", "x" * 30,
         "ünïcödé", "Ω", "-", "0", "10", "9"]


def generate_rows(rng: random.Random) -> list[tuple]:
    """ROWS rows of the COLUMNS (ids 1..ROWS): NULLs, duplicates, extremes, NaN / infinities, non-ASCII."""
    rows = []
    for id_ in range(1, ROWS + 1):
        def maybe(v: Any, p: float = 0.1) -> Any:
            return None if rng.random() < p else v

        scale = rng.choice((0, 1, 2, 3, 5))
        n = Decimal(rng.randint(-10 ** 6, 10 ** 6)).scaleb(-scale)
        d = rng.choice(("2024-02-29", "1999-12-31", "2000-01-01", "0044-03-15 BC", "infinity", "-infinity",
                        f"{rng.randint(1, 9999):04d}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"))
        ts = f"{rng.randint(1900, 2100)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d} " \
             f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}" + \
             rng.choice(("", ".5", ".123456", ".000001"))
        tz = ts + rng.choice(("+00", "+05:30", "-08", "+01"))
        rows.append((
            id_,
            maybe(rng.randint(0, 9)),
            maybe(rng.choice(("red", "green", "blue", "ünï", "日本", ""))),
            maybe(rng.randint(-32768, 32767)),
            maybe(rng.choice((rng.randint(-2 ** 31, 2 ** 31 - 1), rng.randint(-100, 100)))),
            maybe(rng.choice((rng.randint(-2 ** 62, 2 ** 62), rng.randint(-1000, 1000), 2 ** 63 - 1, -2 ** 63))),
            maybe(n),
            maybe(rng.randint(-4000, 4000) / 4),
            maybe(rng.randint(-8 * 10 ** 6, 8 * 10 ** 6) / 8),
            maybe(rng.choice(WORDS) + rng.choice(WORDS)),
            maybe(rng.choice(WORDS)[:20]),
            maybe(rng.choice(("a", "ab ", "é", "abcd", "", "Z"))),
            maybe(rng.random() < 0.5),
            maybe(d),
            maybe(rng.choice((ts, "infinity", "-infinity", "2000-01-01 00:00:00")), 0.15),
            maybe(rng.choice((tz, "infinity", "1999-12-31 23:00:00-01"))),
            maybe(uuid.UUID(int=rng.choice((rng.getrandbits(128), 0, (1 << 128) - 1, rng.getrandbits(8))))),
            maybe(rng.choice((float("nan"), float("inf"), float("-inf"), -0.0, 0.0, 1.5, -2.25))),
            maybe(rng.choice((Decimal("NaN"), Decimal("Infinity"), Decimal("-Infinity"), Decimal("1.5"),
                              Decimal("-0.001")))),
        ))
    return rows


# ------------------------------------------------------------------------------------------------
# The corpus: (sql, compare, params). compare: "exact" (same rows in the same order), "multiset"
# (same rows, any order), "keys" (same ORDER BY key values in order, same rows when no LIMIT),
# "count" (as many rows: LIMIT / OFFSET without ORDER BY may return any rows).

ORDER_COLUMNS = ["i2", "i4", "i8", "n", "f4", "f8", "t", "vc", "bc", "b", "d", "ts", "tz", "u", "fs", "ns", "h", "g"]
NUMBER_COLUMNS = ["i2", "i4", "i8", "n", "f4", "f8", "fs", "ns"]


def corpus() -> list[tuple[str, str, tuple]]:
    q: list[tuple[str, str, tuple]] = []

    def add(sql: str, compare: str = "exact", params: tuple = ()) -> None:
        q.append((sql, compare, params))

    # ORDER BY each type, both directions, NULLS placement, with a unique tiebreaker.
    for c in ORDER_COLUMNS:
        add(f"SELECT id, {c} FROM items ORDER BY {c}, id")
        add(f"SELECT id, {c} FROM items ORDER BY {c} DESC, id DESC")
        add(f"SELECT {c}, id FROM items ORDER BY 1 NULLS FIRST, 2 LIMIT 40")
        add(f"SELECT {c} AS v, id FROM items ORDER BY v DESC NULLS LAST, id LIMIT 25 OFFSET 10")
    # Several keys, names, aliases, positions, hidden keys, * lists.
    add("SELECT id, g, h, t FROM items ORDER BY g DESC, h NULLS FIRST, t, id")
    add("SELECT id FROM items ORDER BY b, d DESC, id")
    add("SELECT id, i4 FROM items ORDER BY i4 % 7, id", "exact")
    add("SELECT * FROM items ORDER BY i8 DESC NULLS LAST, id LIMIT 30")
    add("SELECT *, i4 AS x FROM items ORDER BY x, id OFFSET 1490")
    add("SELECT t FROM items ORDER BY t COLLATE \"C\" DESC, id")
    add("SELECT id FROM items ORDER BY u USING >, id LIMIT 15")
    add("SELECT id, n FROM items ORDER BY n USING <, id OFFSET 5 LIMIT 5")
    add("SELECT g FROM items ORDER BY g", "keys")
    add("SELECT g, h FROM items ORDER BY g, h LIMIT 100", "keys")
    # LIMIT / OFFSET without ORDER BY (any rows: only the count is defined), FETCH, parameters.
    add("SELECT id FROM items LIMIT 10", "count")
    add("SELECT id, t FROM items OFFSET 1490", "count")
    add("SELECT id, i4 FROM items ORDER BY i4 DESC, id LIMIT $1 OFFSET $2", "exact", (7, 3))
    add("SELECT id, i4 FROM items ORDER BY i4, id LIMIT $1", "exact", (12,))
    add("SELECT id FROM items ORDER BY id OFFSET $1", "exact", (1490,))
    add("SELECT id FROM items ORDER BY id LIMIT $1 OFFSET $2", "exact", (None, 1495))
    add("SELECT id FROM items ORDER BY id LIMIT 0")
    add("SELECT id FROM items ORDER BY id OFFSET 5000")
    add("SELECT id, g FROM items ORDER BY g FETCH FIRST 5 ROWS WITH TIES", "keys")
    add("SELECT id, g FROM items ORDER BY g DESC NULLS LAST OFFSET 3 FETCH FIRST 200 ROWS WITH TIES", "keys")
    add("SELECT id, d FROM items ORDER BY d OFFSET 2 ROWS FETCH NEXT 4 ROWS ONLY", "keys")
    add("SELECT id FROM items ORDER BY id LIMIT ALL OFFSET 1497")
    add("SELECT id FROM items ORDER BY id LIMIT 2.5")
    # DISTINCT, DISTINCT ON.
    for c in ["g", "h", "b", "bc", "n", "f8", "t", "d", "tz", "fs", "ns"]:
        add(f"SELECT DISTINCT {c} FROM items", "multiset")
        add(f"SELECT DISTINCT {c} FROM items ORDER BY {c} DESC")
    add("SELECT DISTINCT g, h FROM items ORDER BY h, g")
    add("SELECT DISTINCT g, b FROM items ORDER BY g LIMIT 7", "keys")
    add("SELECT DISTINCT * FROM items ORDER BY id LIMIT 20")
    add("SELECT DISTINCT g, h FROM items", "multiset")
    add("SELECT DISTINCT ON (g) g, id, i4 FROM items ORDER BY g, i4 DESC NULLS LAST, id")
    add("SELECT DISTINCT ON (h, b) h, b, id FROM items ORDER BY h, b, id DESC")
    add("SELECT DISTINCT ON (g) g, id FROM items ORDER BY g, id LIMIT 3 OFFSET 2")
    add("SELECT DISTINCT ON (b) b FROM items", "multiset")
    # UNION ALL / UNION.
    add("SELECT id, g FROM items WHERE g = 1 UNION ALL SELECT id, g FROM items WHERE g = 2 ORDER BY 1 LIMIT 50")
    add("SELECT g FROM items UNION SELECT i2 % 3 FROM items ORDER BY 1")
    add("SELECT h AS x FROM items UNION SELECT t FROM items WHERE id < 100 ORDER BY x DESC LIMIT 10")
    add("SELECT g FROM items UNION ALL SELECT g FROM items ORDER BY g NULLS FIRST OFFSET 2990", "keys")
    # Aggregates over everything, per type.
    for c in NUMBER_COLUMNS:
        add(f"SELECT count({c}), sum({c}), min({c}), max({c}), avg({c}) FROM items")
        add(f"SELECT stddev({c}), stddev_samp({c}), stddev_pop({c}), variance({c}), var_samp({c}), var_pop({c}) "
            f"FROM items")
        add(f"SELECT g, sum({c}), avg({c}), count(*) FROM items GROUP BY g ORDER BY g")
        add(f"SELECT h, variance({c}), stddev_pop({c}) FROM items GROUP BY h", "multiset")
        add(f"SELECT b, min({c}), max({c}), avg({c}) FROM items GROUP BY b ORDER BY b DESC")
    for c in ["t", "vc", "bc", "d", "ts", "tz", "h"]:
        add(f"SELECT min({c}), max({c}), count({c}), count(DISTINCT id) FROM items")
        add(f"SELECT g, min({c}), max({c}) FROM items GROUP BY g ORDER BY 1")
    add("SELECT bool_and(b), bool_or(b), every(b), count(*) FROM items")
    add("SELECT g, bool_and(b), bool_or(b) FROM items GROUP BY g ORDER BY g NULLS FIRST")
    add("SELECT count(*), count(DISTINCT id), sum(DISTINCT id), avg(DISTINCT id) FROM items")
    add("SELECT count(*) FILTER (WHERE i4 > 0), sum(i8) FILTER (WHERE b), avg(n) FILTER (WHERE g < 5) FROM items")
    add("SELECT g, count(*) FILTER (WHERE b), stddev(i4) FILTER (WHERE h <> '') FROM items GROUP BY g ORDER BY g")
    add("SELECT count(*) FROM items WHERE false")
    add("SELECT sum(i4), avg(n), stddev(i2), min(t), bool_and(b) FROM items WHERE id < 0")
    add("SELECT sum(i4), avg(i4), stddev(n) FROM items WHERE id IN (1, 2)")
    add("SELECT var_samp(n), stddev_samp(i8), var_pop(i2) FROM items WHERE id = 1")
    add("SELECT sum(x), avg(x), stddev(x), var_pop(x) FROM (SELECT n * 1000000000000 AS x FROM items) s")
    add("SELECT avg(x), stddev(x) FROM (SELECT n / 1000000 AS x FROM items) s")
    add("SELECT avg(i8), stddev(i8), sum(i8) FROM items WHERE i8 BETWEEN -1000 AND 1000")
    add("SELECT avg(i2::numeric / 7), variance(i2::numeric / 7) FROM items")
    add("SELECT sum(x), avg(x), stddev(x), max(x) FROM (SELECT n + ('0.' || repeat('3', 1200))::numeric AS x "
        "FROM items) s")
    add("SELECT g, sum(x), avg(x) FROM (SELECT g, i8::numeric * i8 * i8 * i8 AS x FROM items) s GROUP BY g ORDER BY g")
    # GROUP BY: keys, expressions, aliases, hidden keys, positions, streaming and hashing.
    add("SELECT g, h, count(*), sum(i4) FROM items GROUP BY g, h ORDER BY g, h")
    add("SELECT g, h, count(*) FROM items GROUP BY g, h ORDER BY h DESC, g")
    add("SELECT h, g, count(*) FROM items GROUP BY g, h ORDER BY h", "keys")
    add("SELECT count(*) FROM items GROUP BY g", "multiset")
    add("SELECT count(*), sum(i2) FROM items GROUP BY g, b ORDER BY 1, 2", "keys")
    add("SELECT i4 % 3 AS m, count(*) FROM items GROUP BY m ORDER BY m")
    add("SELECT i4 % 3, count(*) FROM items GROUP BY i4 % 3 ORDER BY 1")
    add("SELECT date_trunc('year', ts) AS y, count(*), min(ts) FROM items GROUP BY y ORDER BY y DESC NULLS LAST")
    add("SELECT extract(year FROM d) AS y, count(*) FROM items GROUP BY 1 ORDER BY 1 LIMIT 10")
    add("SELECT b, d, count(*) FROM items GROUP BY b, d ORDER BY d, b LIMIT 20 OFFSET 3")
    add("SELECT u, count(*) FROM items GROUP BY u ORDER BY u LIMIT 5")
    add("SELECT tz, count(*) FROM items GROUP BY tz ORDER BY tz DESC LIMIT 5")
    add("SELECT n, count(*) FROM items GROUP BY n ORDER BY n LIMIT 50")
    add("SELECT f8, count(*) FROM items GROUP BY f8 ORDER BY f8 DESC LIMIT 50")
    add("SELECT fs, count(*), sum(i4) FROM items GROUP BY fs ORDER BY fs")
    add("SELECT ns, count(*) FROM items GROUP BY ns ORDER BY ns NULLS FIRST")
    add("SELECT bc, count(*) FROM items GROUP BY bc ORDER BY bc")
    add("SELECT g, count(*) FROM items GROUP BY g ORDER BY count(*) DESC, g")
    add("SELECT g, sum(i4) FROM items GROUP BY g ORDER BY sum(i8), g")
    add("SELECT g, avg(n) FROM items GROUP BY g ORDER BY 2 DESC LIMIT 3")
    add("SELECT g, count(*) FROM items GROUP BY g ORDER BY max(t), g")
    add("SELECT h, count(*) FROM items GROUP BY h ORDER BY h LIMIT 2 OFFSET 1")
    add("SELECT id, count(*) FROM items GROUP BY id ORDER BY id LIMIT 10")
    add("SELECT id % 10 AS k, sum(n) FROM items GROUP BY k ORDER BY k")
    add("SELECT g, count(*) FROM items GROUP BY g ORDER BY count(*) DESC FETCH FIRST 2 ROWS WITH TIES", "keys")
    add("SELECT 1 AS one, g, count(*) FROM items GROUP BY g ORDER BY g")
    add("SELECT count(*) FROM items GROUP BY ()")
    # HAVING.
    add("SELECT g, count(*) FROM items GROUP BY g HAVING count(*) > 140 ORDER BY g")
    add("SELECT g, sum(i4) FROM items GROUP BY g HAVING avg(n) > 0 ORDER BY g")
    add("SELECT g FROM items GROUP BY g HAVING sum(i2) BETWEEN -100000 AND 100000 OR count(*) < 140 ORDER BY g")
    add("SELECT g, count(*) FROM items GROUP BY g HAVING NOT (max(t) >= 'x') AND g > 2 ORDER BY g")
    add("SELECT h, count(*) FROM items GROUP BY h HAVING min(d) < '1000-01-01' ORDER BY h")
    add("SELECT h FROM items GROUP BY h HAVING bool_or(b) = true AND stddev(i4) IS NOT NULL ORDER BY h")
    add("SELECT g, max(f8) FROM items GROUP BY g HAVING max(f8) > 990000.5 ORDER BY g")
    add("SELECT g, avg(n) FROM items GROUP BY g HAVING avg(n) <> 0.5 AND sum(n) IS NULL ORDER BY g")
    add("SELECT count(*) FROM items HAVING count(*) > 10")
    add("SELECT count(*) FROM items HAVING count(*) > 1000000")
    add("SELECT g, count(*) FROM items GROUP BY g HAVING count(*) > 130 ORDER BY g LIMIT 3")
    add("SELECT b, count(*) FROM items GROUP BY b HAVING max(ts) > '2099-06-01 00:00:00' ORDER BY b")
    add("SELECT g, count(*) FROM items GROUP BY g HAVING count(*) > $1 ORDER BY g", "exact", (140,))
    add("SELECT h, avg(n) FROM items GROUP BY h HAVING avg(n) < $1 AND max(t) > $2 ORDER BY h LIMIT $3", "exact",
        ("1000.5", "b", 4))
    add("SELECT g, sum(f8) FROM items GROUP BY g HAVING sum(f8) >= $1 OR min(d) = $2 ORDER BY g", "exact",
        ("-1e6", "2024-02-29"))
    # DISTINCT with aggregates.
    add("SELECT DISTINCT count(*) FROM items GROUP BY g", "multiset")
    add("SELECT DISTINCT b, count(*) FROM items GROUP BY b, g ORDER BY 1, 2")
    # GROUP BY the sharding key keeps groups on one shard: merged as rows (any aggregate).
    add("SELECT id, string_agg(t, ',' ORDER BY t), count(*) FROM items GROUP BY id ORDER BY id LIMIT 20")
    add("SELECT id, array_agg(g) FROM items GROUP BY id HAVING count(*) = 1 ORDER BY id DESC LIMIT 5")
    return q
