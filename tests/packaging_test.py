"""What ships with the package and what a run records about the code that made it.

The license, citation and typing marker exist and are well formed; the version is written once
(`dropnet_jax.__version__`, which pyproject.toml reads) and is what the installed metadata says; every
subpackage is listed in pyproject.toml (the list is explicit because experiments/ is installed as
dropnet_jax.experiments); config.json carries the provenance (version, git commit, JAX/Flax, devices).
"""

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

import dropnet_jax
from dropnet_jax.runs import run_dir as run_dir_lib

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / 'dropnet_jax'


def pyproject() -> dict:
  tomllib = pytest.importorskip('tomllib')  # Python 3.11+
  return tomllib.loads((REPO / 'pyproject.toml').read_text())


def test_license_citation_and_typing_marker_ship():
  text = (REPO / 'LICENSE').read_text()
  assert 'Apache License' in text and 'Version 2.0, January 2004' in text and 'END OF TERMS AND CONDITIONS' in text
  assert pyproject()['project']['license'] == 'Apache-2.0'
  assert (PACKAGE / 'py.typed').is_file()
  assert 'py.typed' in pyproject()['tool']['setuptools']['package-data']['dropnet_jax']


def test_citation_cff_parses_and_cites_the_paper():
  cff = yaml.safe_load((REPO / 'CITATION.cff').read_text())
  assert cff['cff-version'] == '1.2.0' and cff['title'] and cff['authors'] and cff['license'] == 'Apache-2.0'
  papers = [cff.get('preferred-citation', {}), *cff.get('references', [])]
  paper = next(p for p in papers if 'DropNet' in p.get('title', ''))
  assert paper['title'] == 'DropNet: Reducing Neural Network Complexity via Iterative Pruning'
  assert [a['family-names'] for a in paper['authors']] == ['Tan', 'Motani']
  assert paper['year'] == 2020 and paper['volume'] == 119 and 'ICML' in paper['conference']['name']


def test_the_version_is_written_once():
  project = pyproject()
  assert 'version' not in project['project'] and 'version' in project['project']['dynamic']
  assert project['tool']['setuptools']['dynamic']['version'] == {'attr': 'dropnet_jax.__version__'}
  assert re.fullmatch(r'\d+\.\d+\.\d+([.-]?\w+)*', dropnet_jax.__version__)
  # What pip recorded at install time: stale if __version__ changed since (reinstall: pip install -e .).
  assert importlib.metadata.version('dropnet_jax') == dropnet_jax.__version__


def test_every_subpackage_is_listed_in_pyproject():
  setuptools = pyproject()['tool']['setuptools']
  on_disk = {'.'.join(path.parent.relative_to(REPO).parts) for path in PACKAGE.rglob('__init__.py')}
  on_disk.add('dropnet_jax.experiments')  # experiments/, installed under the package
  assert set(setuptools['packages']) == on_disk
  assert setuptools['package-dir'] == {'dropnet_jax.experiments': 'experiments'}
  assert (REPO / 'experiments' / '__init__.py').is_file()


def test_config_json_records_the_provenance(tmp_path):
  import jax
  import flax
  from dropnet_jax.config import ExperimentConfig
  run = run_dir_lib.RunDir(str(tmp_path / 'run'), 'dropnet', ExperimentConfig())
  with run.open():
    pass
  provenance = json.loads((tmp_path / 'run' / 'config.json').read_text())['provenance']
  device = jax.devices()[0]
  assert provenance['dropnet_jax'] == dropnet_jax.__version__
  assert provenance['jax'] == jax.__version__ and provenance['flax'] == flax.__version__
  assert provenance['device_kind'] == device.device_kind and provenance['platform'] == device.platform
  assert provenance['device_count'] == jax.device_count()
  if shutil.which('git') and (REPO / '.git').exists():
    head = subprocess.run(['git', '-C', str(REPO), 'rev-parse', 'HEAD'], capture_output=True, text=True).stdout.strip()
    assert re.fullmatch(re.escape(head) + '(-dirty)?', provenance['git_commit'])
  else:  # an unpacked sdist or wheel: no checkout to name
    assert provenance['git_commit'] is None


@pytest.mark.skipif(shutil.which('git') is None, reason='git not installed')
def test_git_commit_clean_dirty_elsewhere_and_without_git(tmp_path, capfd):
  repo, package = tmp_path / 'checkout', tmp_path / 'checkout' / 'pkg'
  package.mkdir(parents=True)
  (package / '__init__.py').write_text('x = 1\n')
  git = ['git', '-C', str(repo), '-c', 'user.name=t', '-c', 'user.email=t@t', '-c', 'commit.gpgsign=false']
  for args in (['init', '-q'], ['add', '.'], ['commit', '-q', '-m', 'one']):
    subprocess.run([*git, *args], check=True, capture_output=True)
  head = subprocess.run([*git, 'rev-parse', 'HEAD'], capture_output=True, text=True, check=True).stdout.strip()
  assert run_dir_lib.git_commit(str(package)) == head
  (tmp_path / 'checkout' / 'notes.txt').write_text('untracked files do not make it dirty')
  assert run_dir_lib.git_commit(str(package)) == head
  (package / '__init__.py').write_text('x = 2\n')
  assert run_dir_lib.git_commit(str(package)) == head + '-dirty'
  nested = package / 'site-packages' / 'pkg'  # a package inside another repository is not its checkout
  nested.mkdir(parents=True)
  assert run_dir_lib.git_commit(str(nested)) is None
  assert run_dir_lib.git_commit(str(tmp_path / 'elsewhere')) is None  # no repository (or directory) at all
  capfd.readouterr()
  env_without_git = {**os.environ, 'PATH': str(tmp_path / 'empty')}
  proc = subprocess.run([sys.executable, '-c', 'from dropnet_jax.runs.run_dir import git_commit; '
                         f'print(repr(git_commit({str(package)!r})))'], capture_output=True, text=True,
                        env=env_without_git, cwd=REPO)
  assert proc.returncode == 0 and proc.stdout == 'None\n' and proc.stderr == '', proc.stderr
  assert capfd.readouterr() == ('', '')


def test_the_tuning_package_imports_without_optuna_and_names_the_extra():
  """Optuna is an extra: its settings import without it (so `experiments.tune --help` and the tune
  recipes work), and what needs it names the install command."""
  code = textwrap.dedent('''
      import sys
      sys.modules['optuna'] = None  # as if not installed
      from dropnet_jax import tuning
      from dropnet_jax.tuning.config import TuneConfig
      TuneConfig().validate()
      print(tuning.SearchSpace.__name__)
      try:
        tuning.require_optuna()
      except ValueError as e:
        print('ValueError:', e)
      try:
        tuning.run_worker
      except ImportError as e:
        print('ImportError:', e)
  ''')
  proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=REPO,
                        env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert proc.returncode == 0, proc.stderr[-2000:]
  line = "dropnet_jax.tuning needs Optuna: pip install -e '.[tune]'"
  assert proc.stdout.splitlines() == ['SearchSpace', f'ValueError: {line}', f'ImportError: {line}']


def test_every_module_of_the_package_imports():
  """Every module under dropnet_jax/ imports on its own (so the fast tier touches each one, and a
  module that only a subprocess used to import cannot hide an import error)."""
  import importlib
  import pkgutil
  import dropnet_jax
  names = [m.name for m in pkgutil.walk_packages(dropnet_jax.__path__, 'dropnet_jax.')]
  assert len(names) > 50
  for name in names:
    importlib.import_module(name)
