"""A network's weights as one plain file: safetensors or npz, with the model fields beside them.

Layout (both formats): one tensor per parameter, named by its Flax path joined with '/',
float32, channels last, e.g.

    backbone/enc0/conv0/kernel   [3, 3, 1, 16]    (2-D [kh, kw, in, out]; 3-D [kd, kh, kw, in, out])
    backbone/enc0/norm0/scale    [16]
    backbone/up1/kernel          [2, 2, 32, 16]   (transposed convolution)
    seg_head/kernel              [16, K]          (fine-tuning runs only)
    seg_head/bias                [K]

`backbone/...` is the U-Net (`enc<l>`, `up<l>`, `dec<l>` per level, `bottleneck`); a
pre-training export holds the student's backbone only, a fine-tuning export the whole
segmentation network. The metadata (one JSON object) says what the tensors are and how to
rebuild the network:

    {"format": "pixssl_jax-weights", "format_version": 1,
     "kind": "backbone" | "segmentation", "ndim": 2, "patch_size": [32, 32],
     "model": {...the run's config.model...}, "source": {"workdir": ..., "step": ...},
     "num_classes": K, "label_names": {...}, "preprocessing": {...}}   (segmentation only)

In a `.safetensors` file it is the header's `__metadata__["pixssl_jax"]` (safetensors metadata
maps strings to strings); in an `.npz` file it is the entry `__metadata__`, a 0-d string array.
The safetensors file is written here directly (an 8-byte little-endian header length, the JSON
header, the raw little-endian data), so no extra package is needed to write or read it; the
`safetensors` package and PyTorch read it as well.
"""

import json
import os
import struct
import uuid
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np

FORMAT = 'pixssl_jax-weights'
FORMAT_VERSION = 1
SUFFIXES = ('.safetensors', '.npz')
_META_KEY = '__metadata__'
_DTYPES = {'F64': np.float64, 'F32': np.float32, 'F16': np.float16,
           'BF16': ml_dtypes.bfloat16, 'I64': np.int64, 'I32': np.int32, 'U8': np.uint8}
_CODES = {np.dtype(v): k for k, v in _DTYPES.items()}


class WeightsFileError(ValueError):
  """A weights file that cannot be read or written; the message names it and why."""


def flatten(params: Mapping, prefix: str = '') -> dict[str, np.ndarray]:
  """`{'backbone/enc0/conv0/kernel': array, ...}` of a nested params tree."""
  out = {}
  for key, value in params.items():
    name = f'{prefix}{key}'
    if isinstance(value, Mapping):
      out.update(flatten(value, name + '/'))
    else:
      out[name] = np.asarray(value)
  return out


def unflatten(flat: Mapping[str, np.ndarray]) -> dict:
  """The nested params tree of `flatten`'s names."""
  tree: dict = {}
  for name, value in flat.items():
    *parents, leaf = name.split('/')
    node = tree
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  return tree


def _check_path(path: str) -> None:
  if not str(path).endswith(SUFFIXES):
    raise WeightsFileError(f'{path}: the file name must end in .safetensors or .npz')


def _safetensors_bytes(flat: Mapping[str, np.ndarray], metadata: Mapping) -> list[bytes]:
  header, chunks, offset = {}, [], 0
  for name in sorted(flat):
    array = np.ascontiguousarray(flat[name])
    if array.dtype not in _CODES:
      raise WeightsFileError(f'{name}: dtype {array.dtype} has no safetensors code')
    data = array.astype(array.dtype.newbyteorder('<'), copy=False).tobytes()
    header[name] = {'dtype': _CODES[array.dtype], 'shape': list(array.shape),
                    'data_offsets': [offset, offset + len(data)]}
    chunks.append(data)
    offset += len(data)
  header[_META_KEY] = {'pixssl_jax': json.dumps(dict(metadata), sort_keys=True)}
  text = json.dumps(header, separators=(',', ':')).encode()
  text += b' ' * (-len(text) % 8)  # The data starts 8-byte aligned.
  return [struct.pack('<Q', len(text)), text, *chunks]


def save(path: str, params: Mapping, metadata: Mapping) -> str:
  """Writes `params` (nested) and `metadata` to `path` (.safetensors or .npz), atomically."""
  path = os.fspath(path)
  _check_path(path)
  flat = flatten(params)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  suffix = '.npz' if path.endswith('.npz') else '.safetensors'
  tmp = os.path.join(directory, f'.{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}{suffix}')
  try:
    if suffix == '.npz':
      np.savez(tmp, **flat, **{_META_KEY: np.array(json.dumps(dict(metadata),
                                                                sort_keys=True))})
    else:
      with open(tmp, 'wb') as f:
        for chunk in _safetensors_bytes(flat, metadata):
          f.write(chunk)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


def _read_safetensors(path: str) -> tuple[dict[str, np.ndarray], dict]:
  with open(path, 'rb') as f:
    raw = f.read()
  (length,) = struct.unpack('<Q', raw[:8])
  header = json.loads(raw[8:8 + length])
  meta = header.pop(_META_KEY, {}) or {}
  base, flat = 8 + length, {}
  for name, entry in header.items():
    start, end = entry['data_offsets']
    dtype = np.dtype(_DTYPES[entry['dtype']]).newbyteorder('<')
    flat[name] = np.frombuffer(raw[base + start:base + end], dtype).reshape(
        entry['shape']).astype(dtype.newbyteorder('='))
  return flat, json.loads(meta.get('pixssl_jax', '{}'))


def _read_npz(path: str) -> tuple[dict[str, np.ndarray], dict]:
  with np.load(path, allow_pickle=False) as data:
    flat = {k: data[k] for k in data.files if k != _META_KEY}
    meta = json.loads(str(data[_META_KEY])) if _META_KEY in data.files else {}
  return flat, meta


def load(path: str) -> tuple[dict, dict]:
  """(nested params of numpy arrays, metadata) of a weights file.

  Raises:
    WeightsFileError: missing, unreadable, or not written by `save` (no pixssl_jax metadata).
  """
  path = os.fspath(path)
  _check_path(path)
  if not os.path.exists(path):
    raise WeightsFileError(f'{path}: no such weights file')
  try:
    flat, meta = (_read_npz if path.endswith('.npz') else _read_safetensors)(path)
  except Exception as e:  # pylint: disable=broad-except
    # Truncated files raise struct, JSON, zip or reshape errors: all mean "not readable".
    raise WeightsFileError(f'{path}: not a readable weights file ({type(e).__name__}: {e})'
                           ) from None
  if meta.get('format') != FORMAT:
    raise WeightsFileError(f'{path}: no {FORMAT} metadata; export weights with python -m '
                           'pixssl_jax.export_weights')
  return unflatten(flat), meta


def metadata(kind: str, config, *, step: int, workdir: str, **extra: Any) -> dict:
  """The metadata of an export of `config`'s network (see the module docstring)."""
  return {'format': FORMAT, 'format_version': FORMAT_VERSION, 'kind': kind,
          'ndim': int(config.data.ndim), 'patch_size': [int(p) for p in config.data.patch_size],
          'model': config.model.to_dict(), 'source': {'workdir': str(workdir), 'step': int(step)},
          **extra}
