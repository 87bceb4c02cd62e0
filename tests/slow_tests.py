"""Rewrites tests/slow_tests.txt from a `pytest --durations=0` log: the tests that took 1 s or more
(setup + call + teardown) leave the fast tier (`pytest -m "not slow"`). Usage:
  python -m pytest -q --durations=0 > /tmp/durations.log; python tests/slow_tests.py /tmp/durations.log
"""

import collections
import re
import sys
from pathlib import Path

THRESHOLD_SECONDS = 1.0
LIST = Path(__file__).with_name('slow_tests.txt')


def main(log: str) -> None:
  seconds = collections.defaultdict(float)
  for line in open(log):
    match = re.match(r'([\d.]+)s (setup|call|teardown)\s+(\S+)', line)
    if match:
      seconds[match.group(3)] += float(match.group(1))
  lines = LIST.read_text().splitlines()
  header = [line for line in lines if line.startswith('#')]
  modules = [line for line in lines if line and not line.startswith('#') and '::' not in line]  # kept by hand
  slow = sorted(k for k, v in seconds.items() if v >= THRESHOLD_SECONDS)
  LIST.write_text('\n'.join(header + modules + [f'{k}  # {seconds[k]:.1f}s' for k in slow]) + '\n')
  print(f'{len(slow)} slow tests of {len(seconds)} timed')


if __name__ == '__main__':
  main(sys.argv[1])
