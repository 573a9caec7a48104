"""Cross-shard merge: combining the DataRows of several shards into the one result Postgres would give.

The worker drives a pure state machine with the rows it reads; nothing here does I/O.

    plan = plan_merge(sql, sharding_columns={"id"})        # mergeplan.py; MergeRefused -> 0A000
    # send plan.shard_sql to every shard (Bind result formats: plan.shard_formats(client_formats))
    fields = read_row_description(first shard's RowDescription body)
    client_fields = plan.client_fields(fields)             # the RowDescription for the client
    m = plan.merger(fields, shards=(0, 1, 2), bind=bind)   # OrderedMerge or AggregateMerge
    while not m.done:
        for shard in m.waiting:        # read only from these: memory stays O(shards)
            ... m.push(shard, data_row_body)   or at CommandComplete: m.end(shard)
        send(m.pop_ready())            # complete DataRow messages, hidden columns dropped
    send(m.pop_ready())                # the last rows
    tag = f"SELECT {m.rows}"           # if shards are still running (LIMIT reached): cancel them

Merger arguments: `fields` is the shard RowDescription of shard_sql (its `format` codes must be
the ones the rows come in: take them from a Describe of the portal, or pass `formats`); `shards`
the shard ids (or a count); `bind` (router.params.Bind) for LIMIT/OFFSET parameters;
`extra_float_digits` the session's value (float text output); `collation` the database's
collation (datcollate): text is ordered only in code-point order (values.collation_supported),
so a text ORDER BY / min / max under another collation is refused, and a text group key under
another collation is merged by hashing instead of by the shards' order.

The client's columns in shard_sql are the original statement's, unchanged (hidden columns are
appended after them), so client_fields() is exactly the RowDescription Postgres sends for the
original: no separate Describe of the original statement is needed. Text values are compared as
UTF-8 bytes (client_encoding UTF8 or SQL_ASCII) and text-format dates/timestamps are read in
DateStyle ISO (text-format values otherwise raise MergeError): the worker checks those settings.

Errors: MergeRefused (0A000, an unsupported type or collation, raised by the constructor) and
MergeError (the SQLSTATE Postgres would raise: 22003 overflow, 2201W negative LIMIT...). Both carry
.code and .message for an ErrorResponse; after one, drain and drop the shards' replies.

OrderedMerge (plan.mode "rows"): k-way merge of the shards' sorted streams (or, without ORDER BY,
rows in arrival order); DISTINCT / DISTINCT ON of adjacent rows; OFFSET/LIMIT/WITH TIES, `done`
as soon as the limit is reached. A row is released when every live shard has a row queued or has
ended. AggregateMerge (plan.mode "groups"): each shard sends one partial row per group; partials
are combined exactly (see values.py for the types), then HAVING, DISTINCT, ORDER BY, OFFSET/LIMIT.
When the shards send groups sorted by the group key (plan.streaming) a group is released as soon
as every shard is past it; otherwise all groups are held until every shard has ended.

Aggregate results are computed as Postgres computes them over all rows: count -> int8; sum(int2,
int4) -> int8, sum(int8, numeric) -> numeric (scale: the largest input scale), sum(float4/8) keeps
the type; avg(int, numeric) -> numeric, divided with numeric.c's select_div_scale and rounded half
away from zero; variance family on int/numeric -> numeric from the exact sums (numeric_stddev_internal,
sqrt rounded at the same scale); avg and the variance family on float -> float8, combined with
Postgres's own parallel-aggregate formulas (float8_combine: float results can differ from a
single scan in the last bits, as Postgres's own results depend on row order); min/max keep the
value the shard sent; bool_and/bool_or.
"""

from __future__ import annotations

import heapq
import math
import struct
from collections import deque
from decimal import Decimal
from typing import Any, Callable, Iterable, Optional, Sequence, Union

from .mergeplan import AggSpec, MergeError, MergePlan, MergeRefused, SortKey, plan_merge
from .values import (BINARY, BOOL, BPCHAR, FLOAT4, FLOAT8, FLOATS, INT8, INTEGERS, NUMERIC, TEXT, TEXTS,
                     TIMESTAMPTZ, NumericOverflow, collation_supported, decode, encode, key_function,
                     numeric_from_parts, numeric_parts, to_float4, type_name)

__all__ = ["AggregateMerge", "MergeError", "MergePlan", "MergeRefused", "OrderedMerge", "make_merger",
           "plan_merge", "split_row"]

_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")
_HDR = struct.Struct("!cI")
_ROW = b"D"
_INT8_MIN, _INT8_MAX = -(1 << 63), (1 << 63) - 1
# numeric.c: NUMERIC_MIN_SIG_DIGITS, DEC_DIGITS, NUMERIC_MIN/MAX_DISPLAY_SCALE (division scale).
_MIN_SIG_DIGITS, _DEC_DIGITS, _MIN_DISPLAY_SCALE, _MAX_DISPLAY_SCALE = 16, 4, 0, 1000


def split_row(body: Union[bytes, memoryview]) -> list[Optional[bytes]]:
    """The column values of a DataRow body (Int16 count, then Int32 length + bytes each, -1 = NULL)."""
    body = bytes(body)
    (n,) = _I16.unpack_from(body, 0)
    pos = 2
    out: list[Optional[bytes]] = []
    for _ in range(n):
        (ln,) = _I32.unpack_from(body, pos)
        pos += 4
        if ln < 0:
            out.append(None)
        else:
            out.append(body[pos:pos + ln])
            pos += ln
    return out


def _leading_values(body: bytes, count: int) -> list[Optional[bytes]]:
    """The first `count` column values of a DataRow body (the merge reads only its key columns)."""
    pos = 2
    out: list[Optional[bytes]] = []
    unpack = _I32.unpack_from
    for _ in range(count):
        (ln,) = unpack(body, pos)
        pos += 4
        if ln < 0:
            out.append(None)
        else:
            out.append(body[pos:pos + ln])
            pos += ln
    return out


def _as_body(row: Union[bytes, memoryview, Sequence[Optional[bytes]]]) -> bytes:
    if isinstance(row, (list, tuple)):
        return _row_message(row)[5:]
    return bytes(row)


def _message(body: bytes) -> bytes:
    return _HDR.pack(_ROW, len(body) + 4) + body


def _row_message(values: Sequence[Optional[bytes]]) -> bytes:
    parts = [_I16.pack(len(values))]
    for v in values:
        if v is None:
            parts.append(b"\xff\xff\xff\xff")
        else:
            parts.append(_I32.pack(len(v)))
            parts.append(v)
    return _message(b"".join(parts))


def _visible_prefix(body: bytes, visible: int) -> bytes:
    """A DataRow body without its columns after the first `visible` ones."""
    pos = 2
    for _ in range(visible):
        (ln,) = _I32.unpack_from(body, pos)
        pos += 4 + max(ln, 0)
    return _I16.pack(visible) + body[2:pos]


# What decoding a malformed or unexpected value raises (a DateStyle other than ISO, a short binary value).
_BAD_VALUE = (ValueError, ArithmeticError, struct.error, IndexError, KeyError)


def _unreadable(shard: Any, e: Exception) -> MergeError:
    return MergeError(f"pgherd cannot read a value shard {shard} sent for the merge ({e}); text-format dates "
                      "and timestamps are read in DateStyle ISO only", "0A000")


class _Rev:
    """A key in descending order (heapq and sorting only ever need < and ==)."""

    __slots__ = ("k",)

    def __init__(self, k: Any) -> None:
        self.k = k

    def __lt__(self, other: "_Rev") -> bool:
        return other.k < self.k

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Rev) and self.k == other.k

    def __hash__(self) -> int:
        return hash(self.k)


# NULL placement in a key component: (0,) sorts before (1, value), (2,) after.
_NULL_FIRST, _NULL_LAST = (0,), (2,)


class _Columns:
    """Resolved columns of one shard RowDescription: types, formats and key functions."""

    def __init__(self, plan: MergePlan, fields: Sequence[Any], formats: Optional[Sequence[int]],
                 collation: str) -> None:
        self.n = n = len(fields)
        self.visible = n - plan.hidden
        if self.visible < 0:
            raise MergeError(f"shards returned {n} columns, fewer than the merge's {plan.hidden} hidden ones",
                             "XX000")
        if formats is None:
            formats = [getattr(f, "format", 0) for f in fields]
        elif len(formats) == 1:
            formats = list(formats) * n
        elif len(formats) == 0:
            formats = [0] * n
        self.formats = [1 if f else 0 for f in formats]
        self.oids = [getattr(f, "type_oid", 25) for f in fields]
        self.names = [getattr(f, "name", "?") for f in fields]
        self.text_ok = collation_supported(collation)
        self.collation = collation

    def index(self, col: int) -> int:
        i = col if col >= 0 else self.n + col
        if not 0 <= i < self.n:
            raise MergeError(f"merge column {col} is outside the shard rows' {self.n} columns", "XX000")
        return i

    def key_fn(self, i: int, what: str) -> Callable[[bytes], Any]:
        fn = key_function(self.oids[i], self.formats[i])
        if fn is None:
            raise MergeRefused(f"{what} on column {self.names[i]} of type {type_name(self.oids[i])} cannot be merged "
                               "across shards (pgherd compares integers, numeric, float, text, bool, date, timestamp, "
                               "timestamptz and uuid)")
        return fn

    def is_text(self, i: int) -> bool:
        return self.oids[i] in TEXTS

    def sort_parts(self, keys: Sequence[SortKey], what: str) -> list[tuple]:
        return [(self.index(k.column), self.key_fn(self.index(k.column), what), k.descending, k.nulls_first)
                for k in keys]

    def bad_text_order(self, keys: Sequence[SortKey]) -> list[int]:
        """Positions in keys of text columns ordered by an unsupported database collation."""
        if self.text_ok:
            return []
        return [p for p, k in enumerate(keys) if k.collation is None and self.is_text(self.index(k.column))]

    def text_refusal(self, key: SortKey, what: str) -> MergeRefused:
        name = self.names[self.index(key.column)]
        return MergeRefused(f"{what} text column {name} in collation {self.collation!r} cannot be merged across "
                            'shards: pgherd orders text in code-point order only; use COLLATE "C", or filter by '
                            "the sharding key")


def _key_of(parts: Sequence[tuple], values: Sequence[Optional[bytes]]) -> tuple:
    """The sort key of a row: one component per key, NULLs placed as asked."""
    return tuple([(_NULL_FIRST if nulls_first else _NULL_LAST) if (v := values[i]) is None
                  else (1, _Rev(fn(v)) if desc else fn(v)) for i, fn, desc, nulls_first in parts])


def _eq_key(parts: Sequence[tuple], values: Sequence[Optional[bytes]]) -> tuple:
    """Equality key (DISTINCT, GROUP BY): NULLs equal each other."""
    return tuple(None if values[i] is None else (fn(values[i]),) for i, fn in parts)


class _Base:
    """What both mergers share: shards, limits, output."""

    def __init__(self, plan: MergePlan, fields: Sequence[Any], shards: Union[int, Iterable[Any]], *,
                 formats: Optional[Sequence[int]] = None, bind: Any = None, extra_float_digits: int = 1,
                 collation: str = "C") -> None:
        self.plan = plan
        self.cols = _Columns(plan, fields, formats, collation)
        ids = list(range(shards)) if isinstance(shards, int) else list(shards)
        self.live = set(ids)
        self.limit, self.offset = plan.limits(bind)
        self.extra_float_digits = extra_float_digits
        self.rows = 0  # rows sent to the client so far (the SELECT tag's count)
        self.skipped = 0
        self.done = self.limit == 0
        self.out: list[bytes] = []

    def pop_ready(self) -> list[bytes]:
        """DataRow messages that can be sent now (each a complete message)."""
        out, self.out = self.out, []
        return out

    def _streams(self) -> None:
        """State of a k-way merge of the shards' sorted streams (_enqueue fills it)."""
        self.queues: dict[Any, deque] = {s: deque() for s in self.live}
        self.heap: list[tuple] = []  # (key, seq, shard) of each shard's head row
        self.seq = 0
        self.blocked = len(self.live)  # live shards with nothing queued
        self.last_pushed: dict[Any, tuple] = {}

    def _enqueue(self, shard: Any, key: tuple, item: Any, what: str) -> None:
        """Queue a shard's next row (or group) under its sort key; the heap holds each shard's head."""
        last = self.last_pushed.get(shard)
        if last is not None and key < last:
            raise MergeError(f"shard {shard} returned {what} out of the order pgherd merges in (is the text "
                             "collation not C?)", "XX000")
        self.last_pushed[shard] = key
        q = self.queues[shard]
        if not q:
            heapq.heappush(self.heap, (key, self.seq, shard))
            self.seq += 1
            if shard in self.live:
                self.blocked -= 1
        q.append((key, item))

    def _next(self) -> Optional[tuple]:
        """(shard, key, item) of the smallest queued row, once every live shard has one queued."""
        heap = self.heap
        if not heap or self.blocked or self.done:
            return None
        _, _, shard = heapq.heappop(heap)
        q = self.queues[shard]
        key, item = q.popleft()
        if q:
            heapq.heappush(heap, (q[0][0], self.seq, shard))
            self.seq += 1
        elif shard in self.live:
            self.blocked += 1
        return shard, key, item

    def _waiting_streams(self) -> set:
        """Live shards with nothing queued: the merge needs their next row (or their end)."""
        return {s for s in self.live if not self.queues[s]}

    def _end_stream(self, shard: Any) -> None:
        """A shard sent CommandComplete."""
        if shard in self.live:
            self.live.discard(shard)
            if not self.queues[shard]:
                self.blocked -= 1


class OrderedMerge(_Base):
    """Rows mode: see the module docstring."""

    def __init__(self, plan: MergePlan, fields: Sequence[Any], shards: Union[int, Iterable[Any]],
                 **kw: Any) -> None:
        super().__init__(plan, fields, shards, **kw)
        cols = self.cols
        keys = list(plan.sort)
        hash_dedupe = plan.distinct is not None and not plan.distinct_sorted
        bad = cols.bad_text_order(keys)
        for p in bad:
            if p < plan.order_keys:
                raise cols.text_refusal(keys[p], "ORDER BY")
        if bad:  # sort keys pgherd added for DISTINCT: use the client's order, deduplicate by hashing
            keys = keys[:plan.order_keys]
            hash_dedupe = plan.distinct is not None
        self.parts = cols.sort_parts(keys, "ORDER BY")
        self.read = max((p[0] for p in self.parts), default=-1) + 1  # columns to read for the key
        self.order_len = min(plan.order_keys, len(keys))
        self.hidden = plan.hidden
        self.visible = cols.visible
        # DISTINCT: sorted streams put equal rows next to each other; compare with the previous row.
        self.dedupe_len = 0
        self.seen: Optional[set] = None
        self.dedupe_parts: list[tuple] = []
        if plan.distinct == "on" and not hash_dedupe:
            self.dedupe_len = len(plan.distinct_on)
        elif plan.distinct == "all" and not hash_dedupe:
            self.dedupe_len = len(keys)
        elif plan.distinct is not None:
            self.seen = set()
            distinct_cols = ([cols.index(c) for c in plan.distinct_on] if plan.distinct == "on"
                             else range(self.visible))
            self.dedupe_parts = [(i, cols.key_fn(i, "DISTINCT")) for i in distinct_cols]
        self.prev: Optional[tuple] = None  # key of the last row passed to _emit
        self.last: Optional[tuple] = None  # key of the last row sent (WITH TIES)
        self._streams()

    @property
    def waiting(self) -> set:
        """Shards the merge needs a row (or the end) from before it can release more rows."""
        if self.done:
            return set()
        if not self.parts:
            return set(self.live)
        return self._waiting_streams()

    def push(self, shard: Any, body: Union[bytes, memoryview, Sequence[Optional[bytes]]]) -> None:
        """One row from a shard: its DataRow body (after the 5-byte header), or its column values."""
        if self.done:
            return
        body = _as_body(body)
        if not self.parts:
            self._emit((), body)
            return
        try:
            key = _key_of(self.parts, _leading_values(body, self.read))
        except _BAD_VALUE as e:
            raise _unreadable(shard, e) from None
        self._enqueue(shard, key, body, "rows")

    def end(self, shard: Any) -> None:
        """The shard sent CommandComplete: no more rows from it."""
        self._end_stream(shard)
        if not self.live and not self.heap:
            self.done = True

    def pop_ready(self) -> list[bytes]:
        while (head := self._next()) is not None:
            _, key, body = head
            self._emit(key, body)
        if not self.live and not self.heap:
            self.done = True
        return super().pop_ready()

    def _emit(self, key: tuple, body: bytes) -> None:
        if self.dedupe_len:
            head = key[:self.dedupe_len]
            if self.prev is not None and head == self.prev:
                return
            self.prev = head
        elif self.seen is not None:
            dk = _eq_key(self.dedupe_parts, split_row(body))
            if dk in self.seen:
                return
            self.seen.add(dk)
        if self.skipped < self.offset:
            self.skipped += 1
            return
        limit = self.limit
        if limit is not None and self.rows >= limit:
            if not (self.plan.with_ties and self.last is not None and key[:self.order_len] == self.last):
                self.done = True
                return
        self.out.append(_message(_visible_prefix(body, self.visible) if self.hidden else body))
        self.rows += 1
        self.last = key[:self.order_len]
        if limit is not None and self.rows >= limit and not self.plan.with_ties:
            self.done = True


# ------------------------------------------------------------------------------------------------
# Exact numeric arithmetic (numeric.c semantics) on (unscaled int, scale) pairs.

class _NumSum:
    """A numeric sum: exact, with NaN / +-Infinity as numeric_add treats them."""

    __slots__ = ("u", "s", "nan", "pinf", "ninf", "any")

    def __init__(self) -> None:
        self.u = self.s = 0
        self.nan = self.pinf = self.ninf = self.any = False

    def add(self, d: Decimal) -> None:
        self.any = True
        if d.is_nan():
            self.nan = True
        elif d.is_infinite():
            if d > 0:
                self.pinf = True
            else:
                self.ninf = True
        else:
            u, s = numeric_parts(d)
            if s > self.s:
                self.u *= 10 ** (s - self.s)
                self.s = s
            elif s < self.s:
                u *= 10 ** (self.s - s)
            self.u += u

    def add_int(self, v: int) -> None:
        self.any = True
        self.u += v * 10 ** self.s

    def special(self) -> Optional[Decimal]:
        if self.nan or (self.pinf and self.ninf):
            return Decimal("NaN")
        if self.pinf:
            return Decimal("Infinity")
        if self.ninf:
            return Decimal("-Infinity")
        return None

    def value(self) -> Optional[Decimal]:
        if not self.any:
            return None
        sp = self.special()
        return sp if sp is not None else numeric_from_parts(self.u, self.s)


def _lead(u: int, s: int) -> tuple[int, int]:
    """(weight, first base-10000 digit) of |u| * 10^-s (numeric.c's NumericVar layout); (0, 0) for 0."""
    u = abs(u)
    if u == 0:
        return 0, 0
    groups = -(-s // _DEC_DIGITS)
    n = u * 10 ** (_DEC_DIGITS * groups - s)
    ndigits = (len(Decimal(n).as_tuple().digits) + _DEC_DIGITS - 1) // _DEC_DIGITS  # no int -> str: 4300-digit limit
    return ndigits - 1 - groups, n // 10000 ** (ndigits - 1)


def _select_div_scale(u1: int, s1: int, u2: int, s2: int) -> int:
    """numeric.c select_div_scale: at least 16 significant digits, at least either input's scale."""
    w1, f1 = _lead(u1, s1)
    w2, f2 = _lead(u2, s2)
    qweight = w1 - w2
    if f1 <= f2:
        qweight -= 1
    rscale = _MIN_SIG_DIGITS - qweight * _DEC_DIGITS
    rscale = max(rscale, s1, s2, _MIN_DISPLAY_SCALE)
    return min(rscale, _MAX_DISPLAY_SCALE)


def _div_round(u1: int, s1: int, u2: int, s2: int, rscale: int) -> int:
    """(u1e-s1 / u2e-s2) at rscale digits, rounded half away from zero (div_var with round)."""
    num = u1 * 10 ** (rscale + s2)
    den = u2 * 10 ** s1
    q, r = divmod(abs(num), abs(den))
    if 2 * r >= abs(den):
        q += 1
    return -q if (num < 0) != (den < 0) else q


def _sqrt_round(u: int, s: int, rscale: int) -> int:
    """sqrt(u e-s) at rscale digits, rounded half up (sqrt_var computes the exact floor with
    extra digits, then round_var)."""
    shift = 2 * (rscale + 1) - s
    n = u * 10 ** shift if shift >= 0 else u // 10 ** (-shift)
    t = math.isqrt(n)
    q, d = divmod(t, 10)
    return q + 1 if d >= 5 else q


def _float_add(a: float, b: float, single: bool) -> float:
    """float8pl / float4pl, with their overflow error."""
    r = a + b
    if single:
        try:
            r = to_float4(r)
        except NumericOverflow:
            r = math.inf
    if math.isinf(r) and not math.isinf(a) and not math.isinf(b):
        raise MergeError("value out of range: overflow", "22003")
    return r


# ------------------------------------------------------------------------------------------------
# Aggregate accumulators: add(values) with a partial row; result() -> (python value or raw bytes).

class _Acc:
    __slots__ = ()

    def add(self, values: Sequence[Optional[bytes]]) -> None:
        raise NotImplementedError

    def result(self) -> Optional[bytes]:
        raise NotImplementedError


class _Spec:
    """One aggregate column, resolved against the shard RowDescription."""

    def __init__(self, spec: AggSpec, cols: _Columns, efd: int) -> None:
        self.func = spec.func
        self.i = cols.index(spec.column)
        self.oid = cols.oids[self.i]
        self.fmt = cols.formats[self.i]
        self.helpers = [cols.index(h) for h in spec.helpers]
        self.hoids = [cols.oids[h] for h in self.helpers]
        self.hfmts = [cols.formats[h] for h in self.helpers]
        self.efd = efd
        self.text = spec.text
        func, oid = self.func, self.oid
        refuse = MergeRefused(f"{spec.text} of type {type_name(oid)} cannot be merged across shards")
        if func == "count":
            if oid != INT8:
                raise refuse
        elif func == "sum":
            if oid not in (INT8, NUMERIC, FLOAT4, FLOAT8):
                raise refuse
        elif func in ("min", "max"):
            self.key = cols.key_fn(self.i, spec.text)
            if oid in TEXTS and not cols.text_ok:
                raise MergeRefused(f"{spec.text} on text in collation {cols.collation!r} cannot be merged across "
                                   'shards: pgherd compares text in code-point order only; use COLLATE "C"')
        elif func in ("bool_and", "bool_or"):
            if oid != BOOL:
                raise refuse
        elif func == "avg" or func in ("var_pop", "var_samp", "stddev_pop", "stddev_samp"):
            if oid not in (NUMERIC, FLOAT8) or self.hoids[0] != INT8 or self.hoids[1] not in (INT8, NUMERIC, FLOAT4,
                                                                                                FLOAT8):
                raise refuse
        else:
            raise refuse

    def new(self) -> "_Acc":
        return _ACCS[self.func](self)

    def encode(self, value: Any) -> Optional[bytes]:
        if value is None:
            return None
        try:
            return encode(self.oid, self.fmt, value, self.efd)
        except NumericOverflow as e:
            raise MergeError(str(e), "22003") from None


class _Count(_Acc):
    __slots__ = ("spec", "n")

    def __init__(self, spec: _Spec) -> None:
        self.spec, self.n = spec, 0

    def add(self, values: Sequence[Optional[bytes]]) -> None:
        raw = values[self.spec.i]
        if raw is not None:
            self.n += decode(INT8, self.spec.fmt, raw)

    def result(self) -> Optional[bytes]:
        return self.spec.encode(self.n)


class _Sum(_Acc):
    __slots__ = ("spec", "v", "num")

    def __init__(self, spec: _Spec) -> None:
        self.spec = spec
        self.v: Any = None
        self.num = _NumSum() if spec.oid == NUMERIC else None

    def add(self, values: Sequence[Optional[bytes]]) -> None:
        sp = self.spec
        raw = values[sp.i]
        if raw is None:
            return
        x = decode(sp.oid, sp.fmt, raw)
        if self.num is not None:
            self.num.add(x)
        elif self.v is None:
            self.v = x
        elif sp.oid == INT8:
            self.v += x
        else:
            self.v = _float_add(self.v, x, sp.oid == FLOAT4)

    def result(self) -> Optional[bytes]:
        return self.spec.encode(self.num.value() if self.num is not None else self.v)


class _MinMax(_Acc):
    __slots__ = ("spec", "best", "raw")

    def __init__(self, spec: _Spec) -> None:
        self.spec, self.best, self.raw = spec, None, None

    def add(self, values: Sequence[Optional[bytes]]) -> None:
        raw = values[self.spec.i]
        if raw is None:
            return
        k = self.spec.key(raw)
        if self.raw is None or (k < self.best if self.spec.func == "min" else self.best < k):
            self.best, self.raw = k, raw

    def result(self) -> Optional[bytes]:
        return self.raw


class _Bool(_Acc):
    __slots__ = ("spec", "v")

    def __init__(self, spec: _Spec) -> None:
        self.spec, self.v = spec, None

    def add(self, values: Sequence[Optional[bytes]]) -> None:
        raw = values[self.spec.i]
        if raw is None:
            return
        b = decode(BOOL, self.spec.fmt, raw)
        if self.v is None:
            self.v = b
        elif self.spec.func == "bool_and":
            self.v = self.v and b
        else:
            self.v = self.v or b

    def result(self) -> Optional[bytes]:
        return self.spec.encode(self.v)


class _Avg(_Acc):
    """avg: helpers count(x), sum(x); numeric result (int/numeric input) or float8 (float input)."""

    __slots__ = ("spec", "n", "num", "fsum", "finf")

    def __init__(self, spec: _Spec) -> None:
        self.spec = spec
        self.n = 0
        self.num = _NumSum()
        self.fsum = 0.0  # float8_accum's Sx starts at 0
        self.finf = False

    def add(self, values: Sequence[Optional[bytes]]) -> None:
        sp = self.spec
        ci, si = sp.helpers[0], sp.helpers[1]
        n = decode(INT8, sp.hfmts[0], values[ci]) if values[ci] is not None else 0
        if n == 0:
            return
        self.n += n
        raw = values[si]
        soid = sp.hoids[1]
        if sp.oid == NUMERIC:
            x = decode(soid, sp.hfmts[1], raw)
            if soid == INT8:
                self.num.add_int(x)
            else:
                self.num.add(x)
            return
        if soid == FLOAT4:
            # float4 input: the shard's float4 sum lost precision; its avg (float8 Sx / N) did not.
            x = decode(FLOAT8, sp.fmt, values[sp.i]) * n
        else:
            x = float(decode(soid, sp.hfmts[1], raw))
        self.finf = self.finf or math.isinf(x)
        self.fsum += x

    def result(self) -> Optional[bytes]:
        sp = self.spec
        if self.n == 0:
            return sp.encode(None)
        if sp.oid == FLOAT8:
            if math.isinf(self.fsum) and not self.finf:
                raise MergeError("value out of range: overflow", "22003")
            return sp.encode(self.fsum / self.n)
        special = self.num.special()
        if special is not None:
            return sp.encode(special)
        u, s = self.num.u, self.num.s
        rscale = _select_div_scale(u, s, self.n, 0)
        return sp.encode(numeric_from_parts(_div_round(u, s, self.n, 0, rscale), rscale))


class _Variance(_Acc):
    """var_pop/var_samp/stddev_pop/stddev_samp: helpers count(x), sum(x), sum(x::numeric *
    x::numeric), var_pop(x). Numeric path: exact (numeric_stddev_internal); float path: per-shard
    (N, Sx, Sxx = var_pop * N) combined as float8_combine does."""

    __slots__ = ("spec", "n", "sx", "sxx", "fn", "fsx", "fsxx")

    def __init__(self, spec: _Spec) -> None:
        self.spec = spec
        self.n = 0
        self.sx = _NumSum()
        self.sxx = _NumSum()
        self.fn = 0.0
        self.fsx = 0.0
        self.fsxx = 0.0

    def add(self, values: Sequence[Optional[bytes]]) -> None:
        sp = self.spec
        ci, si, qi, vi = sp.helpers
        n = decode(INT8, sp.hfmts[0], values[ci]) if values[ci] is not None else 0
        if n == 0:
            return
        self.n += n
        soid = sp.hoids[1]
        sx = decode(soid, sp.hfmts[1], values[si])
        if sp.oid == NUMERIC:
            if soid == INT8:
                self.sx.add_int(sx)
            else:
                self.sx.add(sx)
            self.sxx.add(decode(sp.hoids[2], sp.hfmts[2], values[qi]))
            return
        n2, sx2 = float(n), float(sx)
        sxx2 = float(decode(sp.hoids[3], sp.hfmts[3], values[vi])) * n2
        if self.fn == 0.0:
            self.fn, self.fsx, self.fsxx = n2, sx2, sxx2
            return
        n1, sx1, sxx1 = self.fn, self.fsx, self.fsxx
        total = n1 + n2
        tmp = sx1 / n1 - sx2 / n2
        self.fn, self.fsx = total, sx1 + sx2
        self.fsxx = sxx1 + sxx2 + n1 * n2 * tmp * tmp / total

    def result(self) -> Optional[bytes]:
        sp = self.spec
        func = sp.func
        sample = func in ("var_samp", "stddev_samp")
        root = func.startswith("stddev")
        n = self.n
        if n == 0 or (sample and n <= 1):
            return sp.encode(None)
        if sp.oid == FLOAT8:
            v = self.fsxx / (self.fn - 1.0 if sample else self.fn)
            return sp.encode(math.sqrt(v) if root and not math.isnan(v) else v)
        if self.sx.special() is not None or self.sxx.special() is not None:
            return sp.encode(Decimal("NaN"))
        u, d = self.sx.u, self.sx.s
        qu, qs = self.sxx.u, self.sxx.s
        # N * sumX2 - sumX * sumX at scale 2 * d (both products exact, as mul_var at that scale).
        num = n * qu * 10 ** (2 * d - qs) if qs <= 2 * d else n * qu // 10 ** (qs - 2 * d)
        num -= u * u
        if num <= 0:
            return sp.encode(Decimal(0))
        den = n * (n - 1) if sample else n * n
        rscale = _select_div_scale(num, 2 * d, den, 0)
        var = _div_round(num, 2 * d, den, 0, rscale)
        if root:
            var = _sqrt_round(var, rscale, rscale)
        return sp.encode(numeric_from_parts(var, rscale))


_ACCS: dict[str, Callable[[_Spec], _Acc]] = {
    "count": _Count, "sum": _Sum, "min": _MinMax, "max": _MinMax, "bool_and": _Bool, "bool_or": _Bool,
    "avg": _Avg, "var_pop": _Variance, "var_samp": _Variance, "stddev_pop": _Variance, "stddev_samp": _Variance,
}


# ------------------------------------------------------------------------------------------------
# HAVING after the merge

_NUMBERS = INTEGERS | {NUMERIC} | FLOATS


def _comparable(oid: int, value: Any) -> tuple:
    """A value in a domain where Postgres's comparison operators are Python's: numbers (exact, or
    as float8 when a float takes part), text (bpchar without trailing spaces), others by key."""
    if oid in INTEGERS or oid == NUMERIC:
        return ("n", value if isinstance(value, Decimal) else Decimal(value))
    if oid in FLOATS:
        return ("f", value)
    if oid == BPCHAR:
        return ("t", value.rstrip(b" "))
    if oid in TEXTS:
        return ("t", value)
    return (oid, value)


def _num_key(domain: tuple, as_float: bool) -> tuple:
    kind, v = domain
    if as_float:
        f = float(v)
        return (1, 0.0) if f != f else (0, f)
    if v.is_nan():
        return (3,)
    if v.is_infinite():
        return (0,) if v < 0 else (2,)
    return (1, v)


def _compare(a: tuple, b: tuple) -> int:
    if a[0] in ("n", "f") and b[0] in ("n", "f"):
        as_float = "f" in (a[0], b[0])
        ka, kb = _num_key(a, as_float), _num_key(b, as_float)
    else:
        ka, kb = a[1], b[1]
    return (ka > kb) - (ka < kb)


_TESTS: dict[str, Callable[[int], bool]] = {
    "=": lambda c: c == 0, "<>": lambda c: c != 0, "<": lambda c: c < 0, "<=": lambda c: c <= 0,
    ">": lambda c: c > 0, ">=": lambda c: c >= 0,
}


class _Having:
    """A HAVING predicate tree compiled against the RowDescription: evaluate(row) -> True/False/None."""

    def __init__(self, pred: tuple, cols: _Columns, bind: Any = None) -> None:
        self.cols = cols
        self.bind = bind
        self.fn = self._compile(pred)

    def _compile(self, p: tuple) -> Callable[[Sequence[Optional[bytes]]], Optional[bool]]:
        kind = p[0]
        if kind in ("and", "or"):
            parts = [self._compile(x) for x in p[1]]
            want = kind == "or"

            def junction(row: Sequence[Optional[bytes]]) -> Optional[bool]:
                unknown = False
                for f in parts:
                    r = f(row)
                    if r is want:
                        return want
                    if r is None:
                        unknown = True
                return None if unknown else not want

            return junction
        if kind == "not":
            inner = self._compile(p[1])
            return lambda row: None if (r := inner(row)) is None else not r
        if kind == "null":
            get = self._operand(p[1], None)
            is_null = p[2]
            return lambda row: (get(row) is None) == is_null
        if kind == "cmp":
            op, a, b = p[1], p[2], p[3]
            ta, tb = self._type(a), self._type(b)
            if ta is not None and tb is not None and ta != tb and not (
                    (ta in _NUMBERS and tb in _NUMBERS) or (ta in TEXTS and tb in TEXTS)):
                raise MergeRefused(f"HAVING compares {type_name(ta)} with {type_name(tb)}; pgherd cannot evaluate "
                                   "that after a cross-shard merge")
            ga, gb = self._operand(a, tb), self._operand(b, ta)
            test = _TESTS[op]

            def cmp(row: Sequence[Optional[bytes]]) -> Optional[bool]:
                x, y = ga(row), gb(row)
                if x is None or y is None:
                    return None
                return test(_compare(x, y))

            return cmp
        if kind == "between":
            a, lo, hi, negated = p[1], p[2], p[3], p[4]
            ge = self._compile(("cmp", ">=", a, lo))
            le = self._compile(("cmp", "<=", a, hi))
            both = self._compile_and([ge, le])
            return (lambda row: None if (r := both(row)) is None else not r) if negated else both
        raise MergeRefused(f"HAVING {p!r} cannot be evaluated after a cross-shard merge")

    @staticmethod
    def _compile_and(parts: list) -> Callable:
        def f(row: Sequence[Optional[bytes]]) -> Optional[bool]:
            unknown = False
            for g in parts:
                r = g(row)
                if r is False:
                    return False
                if r is None:
                    unknown = True
            return None if unknown else True

        return f

    def _type(self, operand: tuple) -> Optional[int]:
        if operand[0] == "col":
            return self.cols.oids[self.cols.index(operand[1])]
        return None

    def _operand(self, operand: tuple, other: Optional[int]) -> Callable[[Sequence[Optional[bytes]]], Any]:
        cols = self.cols
        if operand[0] == "col":
            i = cols.index(operand[1])
            oid, fmt = cols.oids[i], cols.formats[i]
            if key_function(oid, fmt) is None:
                raise MergeRefused(f"HAVING on column {cols.names[i]} of type {type_name(oid)} cannot be evaluated "
                                   "after a cross-shard merge")

            def get(row: Sequence[Optional[bytes]]) -> Any:
                raw = row[i]
                return None if raw is None else _comparable(oid, decode(oid, fmt, raw))

            return get
        if operand[0] == "param":
            value = self._parameter(operand[1], other)
        else:
            value = self._constant(operand[1], operand[2], other)
        return lambda row: value

    def _parameter(self, number: int, other: Optional[int]) -> Optional[tuple]:
        """A Bind value compared with a column: text as a literal of the column's type; binary in
        its declared type, else in the column's type (the type Postgres infers for it)."""
        if self.bind is None:
            raise MergeError(f"HAVING parameter ${number} has no value", "08P01")
        raw, binary, oid = self.bind.param(number)
        if raw is None:
            return None
        raw = bytes(raw)
        if not binary:
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise MergeError(f"invalid value in parameter ${number}", "22021") from None
            kind = "str" if other is None or other not in _NUMBERS else "num"
            return self._constant(kind, text.strip() if kind == "num" else text, other)
        oid = oid if oid and key_function(oid, BINARY) is not None else (other or 0)
        try:
            return _comparable(oid, decode(oid, BINARY, raw))
        except (KeyError, ValueError, struct.error):
            raise MergeError(f"invalid binary value in parameter ${number}", "22P03") from None

    @staticmethod
    def _constant(kind: str, text: Optional[str], other: Optional[int]) -> Optional[tuple]:
        """A literal as the other side's type would read it (an untyped string takes that type)."""
        if kind == "null":
            return None
        if kind in ("int", "num"):
            if other is not None and other not in _NUMBERS:
                raise MergeRefused(f"HAVING compares {type_name(other)} with the number {text}")
            return ("f", float(text)) if other in FLOATS else ("n", Decimal(text))
        if kind == "bool":
            return (BOOL, text == "t")
        oid = other if other is not None else 25
        raw = text.encode()
        try:
            if oid == TIMESTAMPTZ and not any(c in text[10:] for c in "+-Zz"):
                raise ValueError("a timestamptz literal needs an explicit UTC offset here")
            value = decode(oid, TEXT, raw) if oid not in INTEGERS else int(text.strip())
        except (KeyError, ValueError, ArithmeticError) as e:
            raise MergeRefused(f"HAVING ... {text!r} cannot be evaluated after a cross-shard merge ({e})") from None
        if oid in FLOATS:
            value = float(text)
        return _comparable(oid, value)

    def __call__(self, row: Sequence[Optional[bytes]]) -> bool:
        return self.fn(row) is True


class AggregateMerge(_Base):
    """Groups mode: see the module docstring."""

    def __init__(self, plan: MergePlan, fields: Sequence[Any], shards: Union[int, Iterable[Any]],
                 **kw: Any) -> None:
        super().__init__(plan, fields, shards, **kw)
        cols = self.cols
        efd = self.extra_float_digits
        self.specs = [_Spec(a, cols, efd) for a in plan.aggregates]
        self.group_parts = [(cols.index(c), cols.key_fn(cols.index(c), "GROUP BY")) for c in plan.group_by]
        self.having = _Having(plan.having, cols, kw.get("bind")) if plan.having is not None else None
        order = list(plan.order)
        for p in cols.bad_text_order(order):
            raise cols.text_refusal(order[p], "ORDER BY")
        self.order_parts = cols.sort_parts(order, "ORDER BY")
        self.streaming = plan.streaming
        stream_keys = list(plan.sort)
        bad = cols.bad_text_order(stream_keys) if self.streaming else []
        if bad:
            if plan.shard_limited:
                raise cols.text_refusal(stream_keys[bad[0]], "GROUP BY")
            self.streaming = False  # merge the groups by hashing; the shards' order is not ours
        self.stream_parts = cols.sort_parts(stream_keys, "GROUP BY") if self.streaming else []
        self.distinct_parts = ([(i, cols.key_fn(i, "DISTINCT")) for i in range(cols.visible)]
                               if plan.distinct else [])
        self.visible = cols.visible
        self.groups: dict[tuple, list] = {}  # hash mode: group key -> [first row, accumulators]
        # Streaming: a k-way merge of partial rows, combining adjacent rows of one group.
        self._streams()
        self.current: Optional[list] = None  # [stream key, first row, accumulators]

    @property
    def waiting(self) -> set:
        """Shards the merge needs rows (or the end) from before it can release more rows."""
        if self.done:
            return set()
        if not self.streaming:
            return set(self.live)
        return self._waiting_streams()

    def push(self, shard: Any, body: Union[bytes, memoryview, Sequence[Optional[bytes]]]) -> None:
        """One partial row from a shard: its DataRow body, or its column values."""
        if self.done:
            return
        values = list(body) if isinstance(body, (list, tuple)) else split_row(body)
        try:
            if not self.streaming:
                key = _eq_key(self.group_parts, values)
                group = self.groups.get(key)
                if group is None:
                    group = self.groups[key] = [values, [s.new() for s in self.specs]]
                for acc in group[1]:
                    acc.add(values)
                return
            key = _key_of(self.stream_parts, values)
        except _BAD_VALUE as e:
            raise _unreadable(shard, e) from None
        self._enqueue(shard, key, values, "groups")

    def end(self, shard: Any) -> None:
        """The shard sent CommandComplete: no more rows from it."""
        if self.streaming:
            self._end_stream(shard)
        else:
            self.live.discard(shard)

    def pop_ready(self) -> list[bytes]:
        if self.done:
            return super().pop_ready()
        if not self.streaming:
            if not self.live:
                self._finish_hash()
            return super().pop_ready()
        while (head := self._next()) is not None:
            shard, key, values = head
            try:
                self._combine(key, values)
            except _BAD_VALUE as e:
                raise _unreadable(shard, e) from None
        if not self.live and not self.heap and not self.done:
            if self.current is not None:
                self._release(self.current)
            self.current = None
            self.done = True
        return super().pop_ready()

    def _combine(self, key: tuple, values: list) -> None:
        """Streaming: add a partial row to the current group, or release it and start the next."""
        cur = self.current
        if cur is not None and cur[0] != key:
            self._release(cur)
            cur = None
        if cur is None and not self.done:
            cur = self.current = [key, values, [s.new() for s in self.specs]]
        if cur is not None:
            for acc in cur[2]:
                acc.add(values)

    def _final_row(self, first: Sequence[Optional[bytes]], accs: Sequence[_Acc]) -> list[Optional[bytes]]:
        row = list(first)
        for spec, acc in zip(self.specs, accs):
            row[spec.i] = acc.result()
        return row

    def _release(self, cur: list) -> None:
        """A finished group in streaming mode: HAVING, OFFSET, LIMIT, send."""
        self.current = None
        row = self._final_row(cur[1], cur[2])
        if self.having is not None and not self.having(row):
            return
        self._send(row)

    def _send(self, row: Sequence[Optional[bytes]]) -> None:
        if self.skipped < self.offset:
            self.skipped += 1
            return
        if self.limit is not None and self.rows >= self.limit:
            self.done = True
            return
        self.out.append(_row_message(row[:self.visible]))
        self.rows += 1
        if self.limit is not None and self.rows >= self.limit:
            self.done = True

    def _finish_hash(self) -> None:
        rows = []
        for first, accs in self.groups.values():
            row = self._final_row(first, accs)
            if self.having is not None and not self.having(row):
                continue
            rows.append(row)
        self.groups = {}
        if self.distinct_parts:
            seen = set()
            unique = []
            for row in rows:
                k = _eq_key(self.distinct_parts, row)
                if k not in seen:
                    seen.add(k)
                    unique.append(row)
            rows = unique
        parts = self.order_parts
        if parts:
            rows.sort(key=lambda r: _key_of(parts, r))
        last = None
        for row in rows:
            if self.skipped < self.offset:
                self.skipped += 1
                continue
            if self.limit is not None and self.rows >= self.limit:
                if not (self.plan.with_ties and parts and last is not None and _key_of(parts, row) == last):
                    break
            self.out.append(_row_message(row[:self.visible]))
            self.rows += 1
            if parts:
                last = _key_of(parts, row)
        self.done = True


def make_merger(plan: MergePlan, fields: Sequence[Any], shards: Union[int, Iterable[Any]], **kw: Any) -> _Base:
    """OrderedMerge or AggregateMerge for the plan (keyword arguments: see the module docstring)."""
    cls = AggregateMerge if plan.mode == "groups" else OrderedMerge
    return cls(plan, fields, shards, **kw)
