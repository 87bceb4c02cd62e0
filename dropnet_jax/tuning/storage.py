"""Where a study lives: the storage URL checked before anything is written, and the Optuna storage built.

Apart from the worker loop (`study`) because these run before any work (`experiment.prepare` refuses a
bad URL, a missing driver or a database that does not answer in one line) and know nothing of trials.
"""

from __future__ import annotations

import inspect
import os
import random
import sqlite3
import time
from typing import Any

import optuna


def sqlite_url(directory: str) -> str:
  return f'sqlite:///{os.path.abspath(os.path.join(directory, "study.db"))}'


def _importable(module: str) -> bool:
  import importlib.util
  return importlib.util.find_spec(module) is not None


def check_storage(url: str, connect_timeout: int = 10) -> str:
  """The storage URL to use, checked before anything is written: a database URL of a known dialect
  whose driver is installed and, for a server, one that answers within `connect_timeout` seconds.
  Raises ValueError with the reason on one line. A bare postgresql:// URL gets the psycopg2 driver
  when psycopg (3, SQLAlchemy's default) is missing and psycopg2 is installed."""
  import sqlalchemy
  import sqlalchemy.exc
  import sqlalchemy.pool
  try:
    parsed = sqlalchemy.engine.make_url(url)
  except Exception as e:  # sqlalchemy.exc.ArgumentError
    raise ValueError(f'not a database URL ({e})') from None
  if parsed.drivername == 'postgresql' and not _importable('psycopg') and _importable('psycopg2'):
    parsed = parsed.set(drivername='postgresql+psycopg2')
    url = parsed.render_as_string(hide_password=False)
  try:
    dialect = parsed.get_dialect()
  except sqlalchemy.exc.NoSuchModuleError:
    raise ValueError(f'unknown database dialect {parsed.drivername!r} (e.g. sqlite:///path/study.db or '
                     'postgresql://user:password@host/database)') from None
  try:
    dialect.import_dbapi()
  except ImportError as e:
    raise ValueError(f'the {parsed.drivername} driver is not installed ({e}); for PostgreSQL: '
                     "pip install -e '.[postgres]'") from None
  if parsed.get_backend_name() == 'sqlite':
    _check_sqlite_file(parsed.database)
    return url
  connect_args = {'connect_timeout': int(connect_timeout)} if parsed.get_backend_name() == 'postgresql' else {}
  engine = sqlalchemy.create_engine(parsed, connect_args=connect_args, poolclass=sqlalchemy.pool.NullPool)
  try:
    with engine.connect():
      pass
  except sqlalchemy.exc.SQLAlchemyError as e:
    reason = str(getattr(e, 'orig', None) or e).strip().splitlines()
    raise ValueError(f'cannot connect to the database ({reason[0] if reason else type(e).__name__})') from None
  finally:
    engine.dispose()
  return url


def _check_sqlite_file(database: str | None) -> None:
  """An SQLite file can be opened for writing, and its directory (created if missing) takes the file
  and its journal (-wal, -shm): else ValueError naming the path, before anything is written."""
  if not database or database == ':memory:' or database.startswith('file:'):
    return
  path = os.path.abspath(database)
  if os.path.isdir(path):
    raise ValueError(f'{path} is a directory, not an SQLite file')
  if os.path.exists(path) and not os.access(path, os.R_OK | os.W_OK):
    raise ValueError(f'{path} is not writable')
  existing = os.path.dirname(path)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise ValueError(f'{existing} is a file, not a directory (cannot hold {path})')
  if not os.access(existing, os.W_OK | os.X_OK):
    raise ValueError(f'{existing} is not writable (SQLite writes {path} and its journal there)')


def make_storage(url: str, *, heartbeat_interval: int = 10, grace_period: int | None = None,
                 max_retry: int | None = 2) -> 'optuna.storages.RDBStorage':
  """An Optuna RDB storage with heartbeats and retries of stale trials. SQLite files are switched to
  WAL (readers do not block the writer) and wait up to 60 s for a lock."""
  engine_kwargs: dict[str, Any] = {'pool_pre_ping': True}
  if url.startswith('sqlite:///'):
    path = url[len('sqlite:///'):]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with sqlite3.connect(path, timeout=60) as con:  # persistent in the file
      con.execute('PRAGMA journal_mode=WAL')
    engine_kwargs = {'connect_args': {'timeout': 60}}
  # optuna >= 4.9 renamed the callback and its argument.
  retry = getattr(optuna.storages, 'RetryHeartbeatStaleTrialCallback', None) or optuna.storages.RetryFailedTrialCallback
  callback = retry(max_retry=max_retry)
  name = ('heartbeat_stale_trial_callback' if 'heartbeat_stale_trial_callback' in
          inspect.signature(optuna.storages.RDBStorage).parameters else 'failed_trial_callback')
  import sqlalchemy.exc
  for attempt in range(6):
    try:
      return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_interval,
                                        grace_period=grace_period, **{name: callback})
    except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError, sqlalchemy.exc.OperationalError):
      # Workers started together on a fresh database race to create the schema; the loser retries.
      if attempt == 5:
        raise
      time.sleep(0.5 * (attempt + 1) * (1 + random.random()))
