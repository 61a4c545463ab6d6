"""The run store: one SQLite file (``runs/memlab.sqlite`` by default) holding every run.

Each run is one row keyed by its id (a hash of its full config). A row moves through
``running -> done | failed | interrupted`` and every move is a single transaction, so a process
killed at any instant (Ctrl-C, SIGKILL, OOM killer) leaves either the old row or the new one.
WAL journaling keeps readers (``memlab report``) from blocking a runner and survives a killed
writer. A row left ``running`` by a process that no longer exists is stale: the next
``memlab run`` claims it again.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_STORE = Path("runs") / "memlab.sqlite"
SCHEMA_VERSION = 1
STATUSES = ("running", "done", "failed", "interrupted")

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS runs (
    id          TEXT PRIMARY KEY,
    suite       TEXT NOT NULL,
    section     TEXT NOT NULL,
    job         TEXT NOT NULL,
    name        TEXT NOT NULL,
    config      TEXT NOT NULL,
    status      TEXT NOT NULL CHECK (status IN ({", ".join(repr(s) for s in STATUSES)})),
    metrics     TEXT,
    error       TEXT,
    env         TEXT,
    device      TEXT,
    seed        INTEGER,
    host        TEXT,
    pid         INTEGER,
    attempts    INTEGER NOT NULL DEFAULT 0,
    started_at  REAL,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS runs_suite ON runs (suite, section, status);
"""


@dataclass
class RunRecord:
    """One row of the ``runs`` table with its JSON columns decoded."""

    id: str
    suite: str
    section: str
    job: str
    name: str
    config: dict[str, Any]
    status: str
    metrics: dict[str, Any] | None
    error: str | None
    env: dict[str, Any] | None
    device: str | None
    seed: int | None
    host: str | None
    pid: int | None
    attempts: int
    started_at: float | None
    finished_at: float | None

    @property
    def wall_s(self) -> float | None:
        if self.started_at is None or self.finished_at is None:
            return None
        return self.finished_at - self.started_at

    @property
    def error_line(self) -> str:
        """The last non-empty line of the traceback: the exception type and message."""
        lines = [ln for ln in (self.error or "").splitlines() if ln.strip()]
        return lines[-1].strip() if lines else ""


def _dumps(obj: Any) -> str:
    # NaN/inf are legal metric values (a diverged loss); JSON has no literal for them, so they
    # are stored as strings and read back by ``_loads``.
    return json.dumps(_encode_nonfinite(obj), sort_keys=True)


def json_safe(obj: Any) -> Any:
    """obj with NaN and infinities as the strings "nan", "inf", "-inf", as the store keeps them."""
    return _encode_nonfinite(obj)


def _encode_nonfinite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return repr(obj)
    if isinstance(obj, dict):
        return {k: _encode_nonfinite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_encode_nonfinite(v) for v in obj]
    return obj


def _decode_nonfinite(obj: Any) -> Any:
    if obj in ("nan", "inf", "-inf"):
        return float(obj)
    if isinstance(obj, dict):
        return {k: _decode_nonfinite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode_nonfinite(v) for v in obj]
    return obj


def _loads(text: str | None) -> Any:
    return None if text is None else _decode_nonfinite(json.loads(text))


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class Store:
    """A SQLite run store. Use as a context manager, or call ``close()``."""

    def __init__(self, path: str | os.PathLike[str] = DEFAULT_STORE) -> None:
        self.path = Path(path)
        if self.path.exists() and self.path.is_dir():
            raise ValueError(f"store path {str(self.path)!r} is a directory; expected a .sqlite file path")
        self.host = socket.gethostname()
        self.pid = os.getpid()
        # A path that cannot hold a store (its folder is a file, no permission, a file that is not
        # SQLite) is bad input like a bad suite: a ValueError naming the path, not a traceback.
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: no implicit transactions; every write below opens its own
            # BEGIN IMMEDIATE ... COMMIT so a row change is atomic and writers queue on the lock.
            self._conn = sqlite3.connect(self.path, timeout=60.0, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise ValueError(f"cannot open store {str(self.path)!r}: {exc}") from exc
        try:
            self._conn.execute("PRAGMA busy_timeout = 60000")
            mode = self._conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            self._conn.close()
            raise ValueError(
                f"store {str(self.path)!r} is not a memlab SQLite store ({exc}); pass another --store path"
            ) from exc
        if mode.lower() != "wal":
            raise RuntimeError(f"could not switch {self.path} to WAL journaling (got {mode!r})")
        # FULL: a committed status change survives even a power cut, not only a killed process.
        self._conn.execute("PRAGMA synchronous = FULL")
        version = self._conn.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, SCHEMA_VERSION):
            raise ValueError(
                f"store {str(self.path)!r} has schema version {version}; this memlab expects {SCHEMA_VERSION}"
            )
        with self._transaction() as cur:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    cur.execute(statement)
            cur.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    # -- plumbing -------------------------------------------------------------------------
    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Cursor]:
        cur = self._conn.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            yield cur
        except BaseException:
            cur.execute("ROLLBACK")
            raise
        else:
            cur.execute("COMMIT")
        finally:
            cur.close()

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading --------------------------------------------------------------------------
    def _row(self, row: sqlite3.Row | tuple) -> RunRecord:
        (
            id_,
            suite,
            section,
            job,
            name,
            config,
            status,
            metrics,
            error,
            env,
            device,
            seed,
            host,
            pid,
            attempts,
            started_at,
            finished_at,
        ) = row
        return RunRecord(
            id=id_,
            suite=suite,
            section=section,
            job=job,
            name=name,
            config=_loads(config),
            status=status,
            metrics=_loads(metrics),
            error=error,
            env=_loads(env),
            device=device,
            seed=seed,
            host=host,
            pid=pid,
            attempts=attempts,
            started_at=started_at,
            finished_at=finished_at,
        )

    _COLUMNS = (
        "id, suite, section, job, name, config, status, metrics, error, env, device, seed, host, pid, "
        "attempts, started_at, finished_at"
    )

    def get(self, run_id: str) -> RunRecord | None:
        row = self._conn.execute(f"SELECT {self._COLUMNS} FROM runs WHERE id = ?", (run_id,)).fetchone()
        return None if row is None else self._row(row)

    def records(
        self, *, suite: str | None = None, status: str | None = None, job: str | None = None
    ) -> list[RunRecord]:
        """Rows in insertion order, optionally filtered by suite, status and job kind."""
        if status is not None and status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
        where, args = [], []
        for col, val in (("suite", suite), ("status", status), ("job", job)):
            if val is not None:
                where.append(f"{col} = ?")
                args.append(val)
        sql = f"SELECT {self._COLUMNS} FROM runs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY rowid"
        return [self._row(r) for r in self._conn.execute(sql, args).fetchall()]

    def suites(self) -> list[str]:
        return [r[0] for r in self._conn.execute("SELECT DISTINCT suite FROM runs ORDER BY suite")]

    def integrity_check(self) -> str:
        """SQLite's own consistency check: ``"ok"`` for a healthy file."""
        return "\n".join(r[0] for r in self._conn.execute("PRAGMA integrity_check").fetchall())

    def is_stale(self, record: RunRecord) -> bool:
        """A ``running`` row whose process is gone (killed) and that nobody will finish."""
        if record.status != "running":
            return False
        if record.host != self.host or record.pid is None:
            # Another host's runner cannot be probed; SQLite files are not shared across hosts
            # in practice (no network file systems), so its row is treated as abandoned.
            return True
        if record.pid == self.pid:
            return True  # left by this very process (an earlier attempt in the same session)
        return not pid_alive(record.pid)

    # -- writing --------------------------------------------------------------------------
    def claim(
        self,
        *,
        run_id: str,
        suite: str,
        section: str,
        job: str,
        name: str,
        config: dict[str, Any],
        seed: int | None,
        device: str,
        env: dict[str, Any],
        retry_failed: bool = True,
    ) -> bool:
        """Mark the run ``running`` for this process unless it is done or being run elsewhere.

        Returns False (and writes nothing) when the run is done, when it failed and
        ``retry_failed`` is False, or when a live process is running it.
        """
        with self._transaction() as cur:
            row = cur.execute(f"SELECT {self._COLUMNS} FROM runs WHERE id = ?", (run_id,)).fetchone()
            attempts = 0
            if row is not None:
                rec = self._row(row)
                if rec.status == "done":
                    return False
                if rec.status == "failed" and not retry_failed:
                    return False
                if rec.status == "running" and not self.is_stale(rec):
                    return False
                attempts = rec.attempts
            cur.execute(
                "INSERT OR REPLACE INTO runs (id, suite, section, job, name, config, status, metrics, error,"
                " env, device, seed, host, pid, attempts, started_at, finished_at)"
                " VALUES (?, ?, ?, ?, ?, ?, 'running', NULL, NULL, ?, ?, ?, ?, ?, ?, ?, NULL)",
                (
                    run_id,
                    suite,
                    section,
                    job,
                    name,
                    _dumps(config),
                    _dumps(env),
                    device,
                    seed,
                    self.host,
                    self.pid,
                    attempts + 1,
                    time.time(),
                ),
            )
        return True

    def _finish(self, run_id: str, status: str, metrics: dict[str, Any] | None, error: str | None) -> None:
        with self._transaction() as cur:
            updated = cur.execute(
                "UPDATE runs SET status = ?, metrics = ?, error = ?, finished_at = ?"
                " WHERE id = ? AND status = 'running' AND host = ? AND pid = ?",
                (
                    status,
                    None if metrics is None else _dumps(metrics),
                    error,
                    time.time(),
                    run_id,
                    self.host,
                    self.pid,
                ),
            ).rowcount
            if updated != 1:
                raise RuntimeError(f"run {run_id} is not running in this process; cannot mark it {status}")

    def finish(self, run_id: str, metrics: dict[str, Any]) -> None:
        """running -> done, with the run's metrics, in one transaction."""
        self._finish(run_id, "done", metrics, None)

    def fail(self, run_id: str, error: str, *, interrupted: bool = False) -> None:
        """running -> failed (kept, with its traceback) or interrupted (re-run next time)."""
        self._finish(run_id, "interrupted" if interrupted else "failed", None, error)

    def insert(self, records: list[RunRecord]) -> None:
        """Add finished runs as they are (e.g. runs of other stores merged into this one), in one
        transaction; a run id already here is an error, never a silent overwrite."""
        cols = [f.name for f in dataclasses.fields(RunRecord)]
        sql = f"INSERT INTO runs ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
        with self._transaction() as cur:
            for rec in records:
                row = {c: getattr(rec, c) for c in cols}
                for c in ("config", "metrics", "env"):  # the JSON columns
                    row[c] = None if row[c] is None else _dumps(row[c])
                try:
                    cur.execute(sql, [row[c] for c in cols])
                except sqlite3.IntegrityError as exc:
                    raise ValueError(f"run {rec.id!r} is already in store {str(self.path)!r}") from exc

    def delete(self, run_ids: list[str]) -> int:
        """Forget runs (so the next ``memlab run`` recomputes them); returns how many were removed."""
        with self._transaction() as cur:
            return sum(cur.execute("DELETE FROM runs WHERE id = ?", (i,)).rowcount for i in run_ids)
