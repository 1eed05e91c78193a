"""The data-parallel device mesh and the shardings of the train state and batches.

One 1-D mesh axis, 'data', over every device of every process: the state is replicated, batches
are split along their leading axis. Collectives are inserted by XLA from these shardings; nothing
here is per-device code.
"""

from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'


def make_data_mesh(devices: list[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A 1-D ('data',) mesh over all devices (of all processes) or the given ones."""
  devices = jax.devices() if devices is None else devices
  # Auto axis types give the classic jit sharding propagation; make_mesh now defaults to Explicit.
  return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(AxisType.Auto,),
                       devices=devices)


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def abstract_replicated(make: Callable[[], Any], mesh: jax.sharding.Mesh) -> Any:
  """Shapes and dtypes of `make()`'s pytree, replicated over `mesh`, computing nothing.

  The restore target for a checkpoint: Orbax reshards onto these shardings whatever topology
  wrote it (one device, a host, a pod).
  """
  sharding = replicated(mesh)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                      jax.eval_shape(make))


def batch_sharded(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading (batch) axis split over 'data', all other axes whole."""
  return NamedSharding(mesh, P(DATA_AXIS))


def global_batch(local_batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, Any]:
  """Assembles each process's local batch into global arrays sharded over the mesh.

  Args:
    local_batch: this process's share, each leaf `[B_local, ...]`; processes hold disjoint
      samples, in process order.

  Returns:
    The same tree of `jax.Array`s of global shape `[B_local * process_count, ...]`.
  """
  sharding = batch_sharded(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)
