"""Reading one dotted field of a config that may lack it (a run written before the field)."""

from typing import Any

import ml_collections

MISSING = object()  # What `field_at` returns for a field the config does not have.


def field_at(config: ml_collections.ConfigDict, path: str) -> Any:
  """The value of the dotted field `path` ('optim.learning_rate'), or MISSING."""
  node = config
  for name in path.split('.'):
    if not isinstance(node, (ml_collections.ConfigDict, dict)) or name not in node:
      return MISSING
    node = node[name]
  return node
