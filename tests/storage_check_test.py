"""The tuner's storage URL is checked before anything is written: one line naming the problem.

Cases of the probe list (issue 23): an unknown dialect, a string that is not a URL, a driver that is
not installed, a server that refuses the connection, a database the server does not have.
"""

import importlib.util
import os
import re
import socket

import pytest

pytest.importorskip('optuna')

from dropnet_jax import tuning  # noqa: E402
from dropnet_jax.tuning import experiment as tune_experiment  # noqa: E402
from dropnet_jax.tuning import study as studies  # noqa: E402
from dropnet_jax.tuning.config import TuneConfig  # noqa: E402
from tuning_test import postgres  # noqa: E402,F401  (the throwaway PostgreSQL server fixture)


def _closed_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]  # nothing listens once the socket is closed


@pytest.mark.parametrize('url,match', [
    ('foo://bar', "unknown database dialect 'foo'"),
    ('notaurl', 'not a database URL'),
])
def test_bad_urls_are_refused_in_one_line(url, match):
  with pytest.raises(ValueError, match=match) as info:
    studies.check_storage(url)
  assert '\n' not in str(info.value)


def test_an_sqlite_file_that_cannot_be_written_is_refused_before_any_work(tmp_path):
  """--storage=sqlite:///<a path under a file, a directory, a read-only directory>/study.db: one line naming
  the path (was sqlite3.OperationalError or FileExistsError from make_storage), nothing created."""
  afile = tmp_path / 'afile'
  afile.write_text('x')
  cases = [(afile / 'study.db', f'{afile} is a file, not a directory'),
           (afile / 'deeper' / 'study.db', f'{afile} is a file, not a directory'),
           (tmp_path, f'{tmp_path} is a directory')]
  readonly = tmp_path / 'readonly'
  readonly.mkdir()
  (readonly / 'old.db').write_text('')
  if os.geteuid() != 0:  # root may write anywhere (the probes use a read-only mount for root)
    readonly.chmod(0o500)
    cases += [(readonly / 'study.db', f'{readonly} is not writable'),
              (readonly / 'sub' / 'study.db', f'{readonly} is not writable')]
  try:
    for path, match in cases:
      url = f'sqlite:///{path}'
      with pytest.raises(ValueError, match=re.escape(match)) as info:
        studies.check_storage(url)
      assert '\n' not in str(info.value)
      out = tmp_path / 'out'
      with pytest.raises(ValueError, match=re.escape(f'--storage={url}: {match}')):
        tune_experiment.prepare(TuneConfig(), str(out), url)
      assert not out.exists() and not (tmp_path / 'readonly' / 'sub').exists()
  finally:
    readonly.chmod(0o700)
  assert sorted(os.listdir(readonly)) == ['old.db']
  fresh = tmp_path / 'new' / 'dir' / 'study.db'  # a directory to create: fine, and nothing made yet
  assert studies.check_storage(f'sqlite:///{fresh}') == f'sqlite:///{fresh}'
  assert not (tmp_path / 'new').exists()


def test_missing_driver_is_named():
  if importlib.util.find_spec('MySQLdb') is not None:
    pytest.skip('the MySQL driver is installed here')
  with pytest.raises(ValueError, match='driver is not installed'):
    studies.check_storage('mysql://user@127.0.0.1/db')


def test_refused_server_fails_fast():
  pytest.importorskip('psycopg2')
  with pytest.raises(ValueError, match='cannot connect.*refused') as info:
    studies.check_storage(f'postgresql+psycopg2://u@127.0.0.1:{_closed_port()}/db', connect_timeout=5)
  assert '\n' not in str(info.value)


def test_sqlite_and_a_live_server_pass_and_a_missing_database_does_not(tmp_path, postgres):  # noqa: F811
  url = f'sqlite:///{tmp_path}/study.db'
  assert studies.check_storage(url) == url
  assert studies.check_storage(postgres) == postgres
  with pytest.raises(ValueError, match='cannot connect.*nosuchdb'):
    studies.check_storage(postgres.rsplit('/', 1)[0] + '/nosuchdb')


def test_prepare_leaves_no_output_directory_behind(tmp_path):
  out = tmp_path / 'study'
  with pytest.raises(ValueError, match='--storage=foo://bar: unknown database dialect'):
    tune_experiment.prepare(TuneConfig(), str(out), 'foo://bar')
  assert not out.exists()


def test_database_gone_mid_study_ends_in_one_line(tmp_path):
  """The PostgreSQL server stops while trials run: the tuner ends with one line naming the storage
  (before: three tracebacks, 184 lines), non-zero."""
  import subprocess
  import time

  import sqlalchemy

  from tuning_test import REPO, _tune_cmd, postgres_server
  with postgres_server() as (url, stop):
    cmd = _tune_cmd(tmp_path / 'pg', '--n_trials=200', '--max_epochs=100', '--patience=100', '--pruner=none',
                    '--retrain_seeds=0', f'--storage={url}')
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    engine = sqlalchemy.create_engine(url)
    deadline = time.time() + 120
    try:
      while time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
        try:
          with engine.connect() as con:
            if con.execute(sqlalchemy.text('SELECT count(*) FROM trial_values')).scalar():
              break  # a trial has finished: the study is under way
        except sqlalchemy.exc.SQLAlchemyError:
          pass
      engine.dispose()
      stop()
      _, stderr = proc.communicate(timeout=180)
    finally:
      if proc.poll() is None:
        proc.kill()
  lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith('[W ')]
  assert proc.returncode != 0
  assert 'Traceback' not in stderr, stderr[-3000:]
  assert lines[-1].startswith('error: the study\'s storage postgresql') and 'rerun the same command' in lines[-1]
