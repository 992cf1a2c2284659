"""Which store survives a writer SIGKILLed at a random moment: DuckDB (the facts warehouse) or
SQLite in WAL mode (the embedded ledger)?

Why: an effect's record must survive whatever kills a worker (the OOM killer, a terminated run,
a power cut). DuckDB rewrites blocks of its file in place when it checkpoints (on every close of
the last connection, on `CHECKPOINT`, past `checkpoint_threshold`), so a kill inside that write
can leave a block whose checksum no longer matches: the whole file then refuses to open. The
crash campaign found it first; here (DuckDB 2.0.1) it measured 2 corrupt files in 2,900 kills of
forked writers and none in 3,500 kills of spawned ones, so forking from a process that had the
file open may play a part. Either way the default CRM keeps its record in the ledger, and the
warehouse gets a copy through the ledger snapshot.

Each trial forks a writer that inserts small rows in a loop, committing each, and (DuckDB)
checkpointing every second insert, so a checkpoint is often in progress; the writer is
SIGKILLed after a seeded random delay, then the parent opens the file, counts the rows and, for
DuckDB, checkpoints it. A file that cannot be opened or read is counted corrupt and set aside
(`*.corrupt<trial>`) for inspection. A row committed is never counted lost: only corruption is.

Run (from the repository root; about 2 minutes for the defaults):

    /work/venv/bin/python bench/store_kills.py [--kills 800] [--store duckdb|sqlite|both]
        [--folder /tmp/store-kills]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import duckdb

FILES_PER_STORE = 4
"""Trials rotate over a few files, so a file lives through many kills (and grows)."""
MAX_DELAY_SECONDS = 0.08
ROW_PADDING = "x" * 200


def _duckdb_writer(path: Path) -> None:
    connection = duckdb.connect(str(path))
    number = 0
    while True:
        number += 1
        connection.execute(
            "INSERT INTO rows VALUES (?, ?) ON CONFLICT DO NOTHING",
            [f"{os.getpid()}-{number}", ROW_PADDING],
        )
        if number % 2 == 0:
            connection.execute("CHECKPOINT")


def _duckdb_check(path: Path) -> int:
    connection = duckdb.connect(str(path))
    try:
        row = connection.execute("SELECT count(*) FROM rows").fetchone()
        connection.execute("CHECKPOINT")
    finally:
        connection.close()
    return int(row[0]) if row else 0


def _duckdb_create(path: Path) -> None:
    connection = duckdb.connect(str(path))
    connection.execute("CREATE TABLE rows (k VARCHAR PRIMARY KEY, v VARCHAR)")
    connection.close()


def _sqlite_connect(path: Path) -> sqlite3.Connection:
    connection = sqlite3.connect(path, timeout=30, isolation_level=None)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")
    return connection


def _sqlite_writer(path: Path) -> None:
    connection = _sqlite_connect(path)
    number = 0
    while True:
        number += 1
        connection.execute("BEGIN IMMEDIATE")
        connection.execute(
            "INSERT OR IGNORE INTO rows VALUES (?, ?)", [f"{os.getpid()}-{number}", ROW_PADDING]
        )
        connection.execute("COMMIT")
        if number % 2 == 0:
            connection.execute("PRAGMA wal_checkpoint(PASSIVE)")


def _sqlite_check(path: Path) -> int:
    connection = _sqlite_connect(path)
    try:
        if connection.execute("PRAGMA integrity_check").fetchone() != ("ok",):
            raise sqlite3.DatabaseError("integrity_check failed")
        row = connection.execute("SELECT count(*) FROM rows").fetchone()
    finally:
        connection.close()
    return int(row[0]) if row else 0


def _sqlite_create(path: Path) -> None:
    connection = _sqlite_connect(path)
    connection.execute("CREATE TABLE rows (k TEXT PRIMARY KEY, v TEXT)")
    connection.close()


STORES: dict[str, tuple[Callable[[Path], None], Callable[[Path], None], Callable[[Path], int]]] = {
    "duckdb": (_duckdb_create, _duckdb_writer, _duckdb_check),
    "sqlite": (_sqlite_create, _sqlite_writer, _sqlite_check),
}


def _set_aside(path: Path, trial: int) -> None:
    for file in path.parent.glob(f"{path.name}*"):
        if ".corrupt" not in file.name:
            file.rename(file.with_name(f"{file.name}.corrupt{trial}"))


def _start_writer(store: str, path: Path, start: str) -> int:
    """The writer's pid: forked from this process, or a new interpreter (spawn) that says when
    it has opened the file."""
    if start == "spawn":
        child = subprocess.Popen(
            [sys.executable, __file__, "--writer", store, str(path)], stdout=subprocess.PIPE
        )
        assert child.stdout is not None
        child.stdout.readline()
        return child.pid
    pid = os.fork()
    if pid == 0:  # the writer: it never returns
        code = 0
        try:
            STORES[store][1](path)
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    return pid


def run(store: str, kills: int, folder: Path, start: str) -> tuple[int, int, int]:
    """(kills, corrupt files, rows in the surviving files) for one store."""
    create, _, check = STORES[store]
    rng = random.Random(f"kills:{store}:{start}")
    paths = [folder / f"{store}{index}.db" for index in range(FILES_PER_STORE)]
    for path in paths:
        create(path)
    corrupt = 0
    for trial in range(kills):
        path = paths[trial % FILES_PER_STORE]
        if not path.exists():
            create(path)
        pid = _start_writer(store, path, start)
        time.sleep(rng.uniform(0.005, MAX_DELAY_SECONDS))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        try:
            check(path)
        except Exception as exc:  # any failure to open or read is the finding
            corrupt += 1
            print(f"  {store} trial {trial}: {type(exc).__name__}: {str(exc)[:160]}", flush=True)
            _set_aside(path, trial)
    rows = sum(check(path) for path in paths if path.exists())
    return kills, corrupt, rows


def main() -> None:
    """Run the kills for the chosen stores and print one line each."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=800)
    parser.add_argument("--store", choices=("duckdb", "sqlite", "both"), default="both")
    parser.add_argument("--folder", type=Path, default=None)
    parser.add_argument("--start", choices=("fork", "spawn"), default="fork")
    parser.add_argument("--writer", nargs=2, metavar=("STORE", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.writer:  # a spawned writer
        store, path = args.writer
        print("ready", flush=True)
        STORES[store][1](Path(path))
        return
    folder = args.folder or Path(tempfile.mkdtemp(prefix="store-kills-"))
    folder.mkdir(parents=True, exist_ok=True)
    stores = ("duckdb", "sqlite") if args.store == "both" else (args.store,)
    print(f"DuckDB {duckdb.__version__}, SQLite {sqlite3.sqlite_version}, Python {sys.version[:6]}")
    print(f"files in {folder}")
    for store in stores:
        started = time.monotonic()
        kills, corrupt, rows = run(store, args.kills, folder, args.start)
        print(
            f"{store:<7} {kills} kills of {args.start}ed writers, {corrupt} corrupt files,"
            f" {rows} rows readable after,"
            f" {time.monotonic() - started:.0f} s"
        )
    if args.folder is None and not any(folder.glob("*.corrupt*")):
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
