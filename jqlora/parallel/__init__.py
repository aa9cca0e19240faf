"""The parallel layer: device meshes, partition specs from Variable metadata, placement on a
mesh, multi-process start-up.

- ``mesh``: ``make_mesh``, ``mesh_from_config`` (axes ``data``, ``fsdp``, ``tensor``);
- ``partition``: ``RULES`` (logical axis -> mesh axis), ``partition_specs``, ``model_shardings``;
- ``placement``: ``shard_model``, ``shard_activations``, ``shard_batch``, ``replicate``,
  ``process_rows``;
- ``distributed``: ``jax.distributed`` from config or environment;
- ``config``: ``MeshConfig``, ``DistributedConfig``, ``ConfigError``.

Training: shard the model, the optimizer and each batch, then call
``jqlora.train_step`` as usual. Its step is one ``jax.jit`` whose inputs carry
``NamedSharding``; XLA (GSPMD) partitions the computation and inserts the
collectives, and nothing leaves the devices between steps. In the compiled step
the NF4 codes of one layer are all-gathered along ``in`` as bytes (FSDP-style,
4x less traffic than 16-bit weights) and decoded on each device; the ``out``
split of column-parallel linears is kept. Checkpoints
(``jqlora.training.checkpoint``) restore onto any mesh.
"""

from jqlora.parallel.mesh import AXES, make_mesh, mesh_from_config
from jqlora.parallel.partition import RULES, model_shardings, partition_specs
from jqlora.parallel.placement import (
                                       BATCH_AXES,
                                       batch_sharding,
                                       process_rows,
                                       replicate,
                                       shard_activations,
                                       shard_batch,
                                       shard_model,
                                       shard_shapes,
)

__all__ = ["AXES", "BATCH_AXES", "RULES", "batch_sharding", "make_mesh", "mesh_from_config",
           "model_shardings", "partition_specs", "process_rows", "replicate",
           "shard_activations", "shard_batch", "shard_model", "shard_shapes"]
