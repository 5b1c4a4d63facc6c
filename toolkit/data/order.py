"""The global data order: a fixed set of virtual readers that ranks and loader workers divide among themselves.

With `data.virtual_readers = V`, the training data is read by V readers whose streams (shards, shuffle, packing)
depend only on their index v, never on how many ranks or workers run them. Reader v's batches are numbered
0, 1, 2, ...; optimizer step s trains on batches [s*k, (s+1)*k) of every reader, where k = global batch /
(batch_size x V). So a step's packed rows are the same on any world size W that divides V: rank r runs the
readers v = r, r + W, r + 2W, ... and its loader workers split those again, each taking its readers in turn.

A step always ends after whole turns over every reader, so a checkpoint at a step boundary is a position in the
global order that any other allowed layout can continue from: the data stream reshards.

Allowed layouts (checked before anything starts): W divides V, the worker count divides V / W, and the global
batch is a multiple of batch_size x V (it is batch_size x accumulation x W, so accumulation = k x V / W).
"""

from __future__ import annotations

from toolkit.config import ConfigError


def owned_readers(virtual: int, *, rank: int, world: int, worker: int = 0, workers: int = 1) -> list[int]:
    """The virtual readers that loader worker `worker` (of `workers`) of `rank` (of `world`) runs, in turn order."""
    return list(range(rank, virtual, world))[worker::workers]


def allowed_world_sizes(virtual: int, *, batch_size: int, global_batch: int, workers: int = 1) -> list[int]:
    """Every world size on which this global order runs unchanged."""
    sizes = []
    for world in range(1, virtual + 1):
        per_rank = virtual // world
        if virtual % world == 0 and per_rank % max(workers, 1) == 0 and global_batch % (batch_size * world) == 0:
            sizes.append(world)
    return sizes


def check_layout(virtual: int, *, world: int, workers: int, batch_size: int, global_batch: int) -> None:
    """Refuse a layout that would not give the global order; the message lists the world sizes that would."""
    if global_batch % (batch_size * virtual):
        raise ConfigError(
            f"train.global_batch_size={global_batch} is not a multiple of train.batch_size x data.virtual_readers = "
            f"{batch_size} x {virtual}; every step takes the same number of batches from every virtual reader"
        )
    if virtual % world or (virtual // world) % max(workers, 1):
        allowed = allowed_world_sizes(virtual, batch_size=batch_size, global_batch=global_batch, workers=workers)
        raise ConfigError(
            f"data.virtual_readers={virtual} cannot be split over {world} ranks x {max(workers, 1)} loader workers "
            f"(data.num_workers): each rank must run the same number of readers, and each of its workers too. "
            f"With these settings the run can use {allowed} ranks; or change data.num_workers"
        )
