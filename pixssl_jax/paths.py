"""User-given paths, made absolute once where they enter a run.

Orbax refuses relative checkpoint paths (and raises in a background thread at the first save,
after the steps ran), and a relative path would also change meaning if the working directory
did. So `--workdir`, `pretrained_workdir`, `init_file`, `data.data_dir` and `data.cache_dir` are resolved
against the current directory when a run starts; URLs such as `gs://bucket/run` are kept as
they are.
"""

import os

import ml_collections

# Config fields that hold a local path or a URL, where present in a config.
CONFIG_PATH_FIELDS = ('pretrained_workdir', 'init_file', 'data.data_dir', 'data.cache_dir')


def is_url(path: str) -> bool:
  """True for `scheme://...` paths (gs://, s3://, ...), which are never made absolute."""
  return '://' in path


def absolute(path: str | os.PathLike | None) -> str | None:
  """`path` with `~` expanded and made absolute against the current directory; URLs unchanged.

  None and '' (an unset config field) come back unchanged.
  """
  if path is None:
    return None
  path = os.fspath(path)
  if not path or is_url(path):
    return path
  return os.path.abspath(os.path.expanduser(path))


def with_absolute_paths(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """An unlocked copy of `config` whose path fields are absolute (see `absolute`)."""
  config = ml_collections.ConfigDict(config.to_dict())
  for field in CONFIG_PATH_FIELDS:
    *parents, leaf = field.split('.')
    node = config
    for name in parents:
      node = node.get(name)
      if node is None:
        break
    if node is not None and leaf in node:
      node[leaf] = absolute(node[leaf])
  return config
