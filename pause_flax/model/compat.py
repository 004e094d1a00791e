"""Parameter trees of earlier releases, converted to today's layout.

The untied output head was stored [D, V] as `head_DxV`; it is now stored
[V, D] as `head_VxD` (like the embedding and Hugging Face's lm_head), for every
backend. `upgrade_params` converts a restored tree; a tree already in today's
layout comes back unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax


def _is_old(x: Any) -> bool:
  return isinstance(x, Mapping) and "head_DxV" in x


def upgrade_params(tree: Any) -> Any:
  """`tree` with every mapping's `head_DxV` [D, V] replaced by `head_VxD` [V, D].

  Works on a parameter tree (nested dicts of arrays) and on anything holding
  such trees, e.g. a train state whose optimizer moments mirror the
  parameters. Arrays keep their type (numpy stays numpy); other entries are
  left as they are.
  """

  def upgrade(x: Any) -> Any:
    if not _is_old(x):
      return x
    if "head_VxD" in x:
      raise ValueError("A parameter tree holds both head_DxV and head_VxD.")
    out = {k: v for k, v in x.items() if k != "head_DxV"}
    out["head_VxD"] = x["head_DxV"].T
    return out

  return jax.tree.map(upgrade, tree, is_leaf=_is_old)
