"""The ClickHouse edge: two back-ends behind one narrow interface, the same SQL on both.

* :class:`ParquetStore` (default, chDB): the sink writes each batch as immutable Parquet
  parts, ``<parts_dir>/<table>/<topic>.<partition>.<first>.<last>.parquet``, written to a
  temporary name and renamed into place, so a reader never sees half a part. Queries run in
  an in-memory chDB session of the *querying* process whose views read
  ``file('<parts_dir>/<table>/*.parquet')``. No process ever opens a chDB data path, so the
  one-process-per-path rule of chDB never bites: the sink, any number of
  ``stormline analytics`` and ``stormline status`` run side by side.
  Small parts are merged now and then (:meth:`ParquetStore.compact`): the merged part
  covers its sources' offsets, so readers skip the sources at once and the sources are
  deleted after a grace period; a query never reads an offset twice.
* :class:`ServerStore`: a ClickHouse server through clickhouse-connect, tables from
  ``deploy/clickhouse/schema.sql`` (ReplacingMergeTree keyed for the canned queries).

Both expose ``insert(table, rows)``, ``query(sql) -> Result`` and ``high_water(table)``: the
highest Kafka offset already stored per (topic, partition). The sink skips what is at or
below it, which makes a redelivered batch add nothing. On the server an insert also carries
a deduplication token (topic.partition.first.last), and ReplacingMergeTree collapses exact
repeats of (topic, partition, offset) on merge, as a second line of defence.
"""

from __future__ import annotations

import os
import re
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.parquet as pq

from stormline.consumers.sink.tables import SCHEMAS, TABLES, arrow_table
from stormline.settings import Settings

SCHEMA_SQL = Path(__file__).resolve().parent.parent.parent / "deploy" / "clickhouse" / "schema.sql"
EMPTY_PART = "_empty.parquet"
_PART = re.compile(r"^(?P<topic>.+)\.(?P<partition>\d+)\.(?P<first>\d+)\.(?P<last>\d+)\.parquet$")


@dataclass(frozen=True)
class Part:
    """One immutable Parquet part: the offsets of one (topic, partition) it holds."""

    topic: str
    partition: int
    first: int
    last: int

    @property
    def name(self) -> str:
        return f"{self.topic}.{self.partition}.{self.first:020d}.{self.last:020d}.parquet"

    @classmethod
    def parse(cls, name: str) -> Part | None:
        m = _PART.match(name)
        if m is None:
            return None
        return cls(m["topic"], int(m["partition"]), int(m["first"]), int(m["last"]))


def live_parts(parts: list[Part]) -> list[Part]:
    """The parts to read: those whose offsets no other part covers (compaction's sources
    stay on disk a while after their merged part appeared)."""
    live = []
    by_tp: dict[tuple[str, int], list[Part]] = defaultdict(list)
    for p in parts:
        by_tp[(p.topic, p.partition)].append(p)
    for group in by_tp.values():
        reach = -1
        for p in sorted(group, key=lambda p: (p.first, -p.last)):
            if p.last > reach:
                live.append(p)
                reach = p.last
    return live


class StoreError(RuntimeError):
    """The store could not be written or queried; the message says what to do."""


@dataclass
class Result:
    columns: list[str]
    rows: list[tuple[Any, ...]]

    def dicts(self) -> list[dict[str, Any]]:
        return [dict(zip(self.columns, r, strict=True)) for r in self.rows]

    def column(self, name: str) -> list[Any]:
        i = self.columns.index(name)
        return [r[i] for r in self.rows]


class Store(Protocol):
    def insert(self, table: str, rows: list[dict[str, Any]]) -> None: ...

    def query(self, sql: str) -> Result: ...

    def high_water(self, table: str) -> dict[tuple[str, int], int]: ...

    def close(self) -> None: ...


def open_store(settings: Settings) -> Store:
    """The configured back-end: a server when ``clickhouse_url`` is set, else chDB on disk."""
    if settings.clickhouse_url:
        return ServerStore(settings)
    return ParquetStore(parts_dir(settings))


def parts_dir(settings: Settings) -> Path:
    return (settings.sink_parts_dir or settings.chdb_path / "parts").resolve()


def _groups(rows: list[dict[str, Any]]) -> dict[tuple[str, int], list[dict[str, Any]]]:
    by: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by[(r["topic"], r["partition"])].append(r)
    return by


# ============================================================================ chDB ==
# chDB keeps one engine per process; every ParquetStore in a process shares this session
# and gets its own database of views, selected with USE under the lock.
_SESSION_LOCK = threading.Lock()
_SESSION: Any = None


def _session() -> Any:
    global _SESSION
    if _SESSION is None:
        from chdb import session

        _SESSION = session.Session()
    return _SESSION


class ParquetStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self._db = "sl_" + uuid.uuid5(uuid.NAMESPACE_URL, str(self.root)).hex[:12]
        self.ensure()

    def ensure(self) -> None:
        """Create each table's directory with an empty part that fixes its columns."""
        for table, schema in SCHEMAS.items():
            d = self.root / table
            d.mkdir(parents=True, exist_ok=True)
            if not (d / EMPTY_PART).exists():
                self._write_atomic(d / EMPTY_PART, schema.empty_table())

    def _write_atomic(self, path: Path, data: pa.Table) -> None:
        tmp = path.with_name(f".tmp-{uuid.uuid4().hex}")
        try:
            pq.write_table(data, tmp, compression="zstd")
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def insert(self, table: str, rows: list[dict[str, Any]]) -> None:
        for (topic, partition), group in _groups(rows).items():
            group.sort(key=lambda r: r["offset"])
            name = Part(topic, partition, group[0]["offset"], group[-1]["offset"]).name
            try:
                self._write_atomic(self.root / table / name, arrow_table(table, group))
            except OSError as exc:
                raise StoreError(f"cannot write {self.root / table / name}: {exc}") from exc

    def parts(self, table: str) -> list[Part]:
        """Every part of ``table``, live or already merged into a bigger one."""
        return [p for name in os.listdir(self.root / table) if (p := Part.parse(name))]

    def high_water(self, table: str) -> dict[tuple[str, int], int]:
        hw: dict[tuple[str, int], int] = {}
        for p in self.parts(table):
            hw[(p.topic, p.partition)] = max(hw.get((p.topic, p.partition), -1), p.last)
        return hw

    def _source(self, table: str) -> str:
        names = [EMPTY_PART, *(p.name for p in live_parts(self.parts(table)))]
        alt = names[0] if len(names) == 1 else "{" + ",".join(names) + "}"
        return str(self.root / table / alt).replace("'", "\\'")

    def query(self, sql: str) -> Result:
        # Views are re-pointed at the live parts for every query, so a part merged by
        # compaction is read once, never twice; a part deleted under a running query is
        # retried with a fresh listing.
        for attempt in range(3):
            with _SESSION_LOCK:
                s = _session()
                s.query(f"CREATE DATABASE IF NOT EXISTS {self._db}")
                for table in TABLES:
                    s.query(
                        f"CREATE OR REPLACE VIEW {self._db}.{table} AS "
                        f"SELECT * FROM file('{self._source(table)}', Parquet)"
                    )
                s.query(f"USE {self._db}")
                try:
                    res = s.query(sql, "ArrowTable")
                    break
                except Exception as exc:
                    vanished = "FILE_DOESNT_EXIST" in str(exc) or "No such file" in str(exc)
                    if vanished and attempt < 2:
                        continue
                    raise StoreError(f"query failed: {exc}") from exc
        tbl: pa.Table = res if isinstance(res, pa.Table) else pa.table({})
        cols = tbl.column_names
        data = [tbl.column(c).to_pylist() for c in cols]
        return Result(list(cols), list(zip(*data, strict=True)) if data else [])

    def compact(
        self,
        table: str,
        *,
        target_rows: int = 1_000_000,
        min_run: int = 8,
        grace_s: float = 60.0,
        only: set[tuple[str, int]] | None = None,
    ) -> int:
        """Merge runs of small consecutive parts of each (topic, partition) into one part.

        The merged part covers the offsets of its sources, so readers skip the sources at
        once (see :func:`live_parts`); the sources are deleted ``grace_s`` after the merge,
        when no query that listed them can still be reading. ``only``: the (topic, partition)
        pairs this process owns, so that two sinks never merge the same offsets. Returns
        how many parts were merged away.
        """
        merged = 0
        by_tp: dict[tuple[str, int], list[Part]] = defaultdict(list)
        for p in live_parts(self.parts(table)):
            if only is None or (p.topic, p.partition) in only:
                by_tp[(p.topic, p.partition)].append(p)
        for group in by_tp.values():
            run: list[Part] = []
            rows = 0
            for p in [*sorted(group, key=lambda p: p.first), None]:
                n = pq.read_metadata(self.root / table / p.name).num_rows if p else 0
                if p is not None and n < target_rows:
                    run.append(p)
                    rows += n
                    if rows < target_rows:
                        continue
                if len(run) >= (2 if rows >= target_rows else min_run):
                    self._merge(table, run)
                    merged += len(run)
                run, rows = [], 0
        self._drop_merged(table, grace_s)
        return merged

    def _merge(self, table: str, run: list[Part]) -> None:
        data = pa.concat_tables(pq.read_table(self.root / table / p.name) for p in run)
        first, last = run[0], run[-1]
        name = Part(first.topic, first.partition, first.first, last.last).name
        self._write_atomic(self.root / table / name, data.cast(SCHEMAS[table]))

    def _drop_merged(self, table: str, grace_s: float) -> None:
        all_parts = self.parts(table)
        live = live_parts(all_parts)
        cutoff = time.time() - grace_s
        for p in set(all_parts) - set(live):
            cover = next(
                c
                for c in live
                if (c.topic, c.partition) == (p.topic, p.partition)
                and c.first <= p.first
                and p.last <= c.last
            )
            if (self.root / table / cover.name).stat().st_mtime <= cutoff:
                (self.root / table / p.name).unlink(missing_ok=True)

    def close(self) -> None:
        pass


# ========================================================================== server ==
def schema_statements(sql: str | None = None) -> list[str]:
    """The statements of ``schema.sql`` (comments dropped), in order."""
    text = sql if sql is not None else SCHEMA_SQL.read_text()
    lines = [ln for ln in text.splitlines() if not ln.strip().startswith("--")]
    return [st.strip() for st in "\n".join(lines).split(";") if st.strip()]


class ServerStore:
    """Tables on a ClickHouse server. Connects lazily and again after any failure, so a
    server that is down (at start or later) is a retryable :class:`StoreError`."""

    def __init__(self, settings: Settings) -> None:
        self.url = settings.clickhouse_url or ""
        self.database = urlparse(self.url).path.strip("/") or settings.clickhouse_database
        self._client: Any = None

    def client(self) -> Any:
        if self._client is not None:
            return self._client
        import clickhouse_connect

        # chdb:// DSNs (clickhouse-connect's in-process chDB client) take no network options.
        net: dict[str, Any] = {} if self.url.startswith("chdb:") else {"connect_timeout": 5}
        try:
            admin = clickhouse_connect.get_client(dsn=self.url, database="default", **net)
            admin.command(f"CREATE DATABASE IF NOT EXISTS {self.database}")
            client = clickhouse_connect.get_client(dsn=self.url, database=self.database, **net)
            for st in schema_statements():
                client.command(st)
        except Exception as exc:
            raise StoreError(
                f"ClickHouse server at {_redact(self.url)} is not usable: {exc}. Check "
                "STORMLINE_CLICKHOUSE_URL, or unset it to use chDB on disk."
            ) from exc
        self._client = client
        return client

    def insert(self, table: str, rows: list[dict[str, Any]]) -> None:
        client = self.client()
        for (topic, partition), group in _groups(rows).items():
            group.sort(key=lambda r: r["offset"])
            token = f"{table}.{topic}.{partition}.{group[0]['offset']}.{group[-1]['offset']}"
            try:
                client.insert_arrow(
                    table,
                    arrow_table(table, group),
                    settings={"insert_deduplication_token": token},
                )
            except Exception as exc:
                self._client = None  # reconnect on the retry
                raise StoreError(f"insert into {table} failed: {_redact(str(exc))}") from exc

    def high_water(self, table: str) -> dict[tuple[str, int], int]:
        res = self.query(f"SELECT topic, partition, max(offset) FROM {table} GROUP BY 1, 2")
        return {(t, int(p)): int(o) for t, p, o in res.rows}

    def query(self, sql: str) -> Result:
        client = self.client()
        try:
            res = client.query(sql)
        except Exception as exc:
            if "Code:" not in str(exc):  # not a SQL error: the connection is suspect
                self._client = None
            raise StoreError(f"query failed: {_redact(str(exc))}") from exc
        return Result(list(res.column_names), [tuple(r) for r in res.result_rows])

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def _redact(text: str) -> str:
    """Mask the password of any URL in ``text``."""
    return re.sub(r"(://[^:/@\s]+:)[^@\s]+@", r"\1***@", text)
