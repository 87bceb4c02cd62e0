"""One look per pruning metric in every figure, and the order metrics are listed in.

Figures from different runs are compared at a glance only if `min` is the same blue everywhere, so
the known metrics have fixed styles (`METRIC_STYLES`); layer-wise variants reuse their global
counterpart's marker and are dashed. The studies relabel lines, e.g. `min (paper)` / `min
(official)` (protocol study), `min p=0.2` (fraction study), `min_randominit` (random re-init
study): such a label is split into its *base* metric and a *variant* (`split_label`), the base
keeps its colour and marker, and each further variant of it gets its own line style and a hollow
marker, so the same metric under two protocols reads as one colour, two lines. Unknown bases get
spare colours in sorted-name order.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

METRIC_STYLES: dict[str, dict[str, Any]] = {
    'min': {'color': 'tab:blue', 'marker': 'o', 'linestyle': '-'},
    'max': {'color': 'tab:orange', 'marker': 's', 'linestyle': '-'},
    'random': {'color': 'tab:green', 'marker': '^', 'linestyle': '-'},
    'min_layer': {'color': 'tab:purple', 'marker': 'o', 'linestyle': '--'},
    'max_layer': {'color': 'tab:brown', 'marker': 's', 'linestyle': '--'},
    'random_layer': {'color': 'tab:olive', 'marker': '^', 'linestyle': '--'},
    'apoz': {'color': 'tab:red', 'marker': 'D', 'linestyle': '-'},
    'apoz_layer': {'color': 'tab:pink', 'marker': 'D', 'linestyle': '--'},
    'oracle': {'color': 'black', 'marker': '*', 'linestyle': ':'},
}
# Handed out, in sorted-name order, to base metrics not listed above.
_SPARE_COLORS = ('tab:gray', 'tab:cyan', '#1b9e77', '#d95f02', '#7570b3', '#e7298a', '#66a61e',
                 '#e6ab02', '#a6761d')
_SPARE_MARKERS = ('v', 'P', 'X', 'h', '<', '>', 'p', 'd')
# The second, third, ... variant of one base metric (the first keeps the base's line style).
_VARIANT_LINESTYLES = (':', '-.', (0, (5, 1.5)), (0, (3, 1, 1, 1, 1, 1)))


def _known_base(word: str) -> str | None:
  """The longest known metric that `word` is or starts with (followed by '_'), or None."""
  known = [m for m in METRIC_STYLES if word == m or word.startswith(m + '_')]
  return max(known, key=len) if known else None


def split_label(label: str) -> tuple[str, str]:
  """(base metric, variant) of a line label.

  'min (paper)' -> ('min', '(paper)'); 'min_layer_official' -> ('min_layer', 'official');
  'min p=0.2' -> ('min', 'p=0.2'); 'DropNet min' -> ('min', 'DropNet'); 'min' -> ('min', '').
  The base is the known metric that the label's first word naming one is or starts with (then '_');
  without one, the label's first word.
  """
  words = label.split(' ')
  index = next((i for i, w in enumerate(words) if _known_base(w)), None)
  if index is None:
    return words[0], ' '.join(words[1:])
  base = _known_base(words[index])
  rest = words[:index] + ([words[index][len(base) + 1:]] if words[index] != base else []) + words[index + 1:]
  return base, ' '.join(w for w in rest if w)


def metric_order(metrics: Iterable[str]) -> list[str]:
  """Labels grouped by base metric, known bases in the paper's order first, then the others sorted;
  within a base the plain metric first, then its variants in the order they first appear."""
  seen = list(dict.fromkeys(metrics))
  known = list(METRIC_STYLES)

  def key(label: str) -> tuple:
    base, variant = split_label(label)
    where = (0, known.index(base), '') if base in METRIC_STYLES else (1, 0, base)
    return where + (variant != '', seen.index(label))

  return sorted(seen, key=key)


def metric_styles(metrics: Iterable[str]) -> dict[str, dict[str, Any]]:
  """matplotlib line keywords (color, marker, linestyle, markerfacecolor) per label, in
  `metric_order`: one colour per base metric, variants told apart by line style and hollow markers."""
  ordered = metric_order(metrics)  # consumes `metrics` once (may be a generator)
  bases = list(dict.fromkeys(split_label(m)[0] for m in ordered))
  unknown = sorted(b for b in bases if b not in METRIC_STYLES)
  base_style = {b: dict(METRIC_STYLES[b]) for b in bases if b in METRIC_STYLES}
  for i, b in enumerate(unknown):
    base_style[b] = {'color': _SPARE_COLORS[i % len(_SPARE_COLORS)],
                     'marker': _SPARE_MARKERS[i % len(_SPARE_MARKERS)], 'linestyle': '-.'}
  styles, count = {}, {b: 0 for b in bases}
  for label in ordered:
    base = split_label(label)[0]
    style = dict(base_style[base])
    k = count[base]
    count[base] += 1
    style['markerfacecolor'] = style['color']
    if k:
      style['linestyle'] = _VARIANT_LINESTYLES[(k - 1) % len(_VARIANT_LINESTYLES)]
      style['markerfacecolor'] = 'white'
    styles[label] = style
  return styles
