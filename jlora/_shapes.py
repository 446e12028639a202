"""Shape arithmetic shared by the factored products and the FP8 kernels."""

from __future__ import annotations


def reshape_groups(old, new) -> list[tuple[list[int], list[int]]] | None:
  """Pairs (old axes, new axes) of contiguous groups with equal products.

  A reshape from `old` to `new` that only merges or splits neighbouring axes
  maps each group of old axes onto one group of new axes; None when it does
  not (the reshape mixes axes across groups).

  Examples:
    >>> reshape_groups((2, 3, 4), (6, 4))
    [([0, 1], [0]), ([2], [1])]
  """
  groups, i, j = [], 0, 0
  while i < len(old) or j < len(new):
    gi, gj, po, pn = [], [], 1, 1
    if i < len(old):
      po *= old[i]
      gi.append(i)
      i += 1
    if j < len(new):
      pn *= new[j]
      gj.append(j)
      j += 1
    while po != pn:
      if po < pn and i < len(old):
        po *= old[i]
        gi.append(i)
        i += 1
      elif pn < po and j < len(new):
        pn *= new[j]
        gj.append(j)
        j += 1
      else:
        return None
    groups.append((gi, gj))
  return groups
