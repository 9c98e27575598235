"""Data parallelism with `jax.jit` over a device mesh with one 'data' axis.

The batch is split over every device of every host (sharding P('data') on its
leading axis); parameters, optimizer state and step are replicated (P()).
XLA inserts the all-reduce of the gradients. The same code runs on 1 CPU,
8 fake CPU devices, 8 GPUs or a TPU pod; with several processes
`jax.distributed` joins them and each process feeds its own part of the global
batch (`global_batch`).

Shapes: G global batch, B per-process batch (G / process count),
b per-device batch (G / device count).
"""

from __future__ import annotations

import os
from typing import Any, Optional

from absl import logging
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'


def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None,
                           auto: bool = False) -> bool:
  """Joins the processes of a multi-host run; returns whether it did.

  Explicit coordinator flags win; otherwise JAX_COORDINATOR_ADDRESS (with
  JAX_NUM_PROCESSES and JAX_PROCESS_ID) from the environment; otherwise, when
  `auto` (Cloud TPU VMs, SLURM), jax's own cluster detection. Must run before
  anything touches a device.
  """
  env = os.environ
  coordinator_address = coordinator_address or env.get(
      'JAX_COORDINATOR_ADDRESS')
  if num_processes is None and 'JAX_NUM_PROCESSES' in env:
    num_processes = int(env['JAX_NUM_PROCESSES'])
  if process_id is None and 'JAX_PROCESS_ID' in env:
    process_id = int(env['JAX_PROCESS_ID'])
  if coordinator_address is None and not auto:
    return False
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes,
                             process_id=process_id)
  logging.info('jax.distributed: process %d of %d, %d local / %d devices.',
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
  return True


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh over all (global) devices, axis 'data'."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  return Mesh(devices.reshape(-1), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over 'data'; other axes whole."""
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(global_batch_size: int, mesh: Mesh,
                     process_count: int, what: str = 'batch_size') -> int:
  """Per-process batch size; ValueError if G does not split evenly."""
  num_devices = mesh.devices.size
  if global_batch_size <= 0:
    raise ValueError(f'{what}={global_batch_size} must be positive.')
  if global_batch_size % num_devices:
    raise ValueError(
        f'{what}={global_batch_size} does not divide over {num_devices} '
        f'devices; use a multiple of {num_devices}.')
  if global_batch_size % process_count:
    raise ValueError(f'{what}={global_batch_size} does not divide over '
                     f'{process_count} processes.')
  return global_batch_size // process_count


def global_batch(local_batch: dict[str, Any], mesh: Mesh) -> dict[str, Any]:
  """Global arrays [G, ...] from this process's numpy batch [B, ...].

  Process p's rows become rows [p*B, (p+1)*B) of the global batch, spread
  over its local devices.
  """
  sharding = batch_sharded(mesh)
  process_count = jax.process_count()

  def to_global(x):
    x = np.asarray(x)
    shape = (x.shape[0] * process_count,) + x.shape[1:]
    return jax.make_array_from_process_local_data(sharding, x, shape)

  return jax.tree.map(to_global, local_batch)


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Puts a pytree of host values on every device (same value everywhere)."""
  sharding = replicated(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_callback(
          np.shape(x), sharding, lambda idx, x=np.asarray(x): x[idx]), tree)


def fetch(tree: Any) -> Any:
  """Replicated device values -> numpy on this host (no cross-host traffic)."""
  return jax.tree.map(
      lambda x: np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array)
      else np.asarray(x), tree)
