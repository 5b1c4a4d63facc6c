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
    """Refuse a layout that would not give the global order, saying which setting to change and which world sizes
    and worker counts would work. The split over ranks and workers is checked first: it is what the user changes
    when moving to another machine, and the global batch is often derived (train.global_batch_size=0), not set."""
    workers = max(workers, 1)  # data.num_workers=0 reads in the main process: one reader slot
    if virtual % world or (virtual // world) % workers:
        raise ConfigError(_split_message(virtual, world=world, workers=workers, batch_size=batch_size,
                                         global_batch=global_batch))  # fmt: skip
    unit = batch_size * virtual
    if global_batch % unit:
        fixed = -(-global_batch // unit) * unit  # the next multiple up
        worlds = allowed_world_sizes(virtual, batch_size=batch_size, global_batch=fixed, workers=workers)
        raise ConfigError(
            f"data.virtual_readers={virtual} needs a global batch that is a multiple of train.batch_size x "
            f"data.virtual_readers = {batch_size} x {virtual} = {unit} packed rows (every step takes the same number "
            f"of batches from every reader), but it is {global_batch} (train.global_batch_size, or when that is 0, "
            f"train.batch_size x train.gradient_accumulation_steps x {world} ranks). Set train.global_batch_size to a "
            f"multiple of {unit}, e.g. {fixed} (the run can then use {_sizes(worlds)} ranks), or lower "
            "data.virtual_readers or train.batch_size"
        )


def _split_message(virtual: int, *, world: int, workers: int, batch_size: int, global_batch: int) -> str:
    """What to change when V readers do not split evenly over `world` ranks x `workers` loader workers."""
    head = (
        f"data.virtual_readers={virtual} cannot be split over {world} ranks x {workers} loader workers "
        f"(data.num_workers): each rank must run the same number of readers, and each of its workers too. "
    )
    unit = batch_size * virtual
    worlds = allowed_world_sizes(virtual, batch_size=batch_size, global_batch=-(-global_batch // unit) * unit,
                                 workers=workers)  # fmt: skip
    if worlds:
        fix = f"With these settings the run can use {_sizes(worlds)} ranks"
    else:
        fix = f"With data.num_workers={workers} no number of ranks works"
    if virtual % world == 0:
        counts = [n for n in range(1, virtual // world + 1) if (virtual // world) % n == 0]
        fix += f"; on {world} ranks, set data.num_workers to {_sizes(counts)} (0 reads in the main process, as 1)"
    else:
        fix += f"; on {world} ranks, set data.virtual_readers to a multiple of {world * workers}"
    return head + fix


def _sizes(values: list[int]) -> str:
    """[1, 2, 4] -> '1, 2 or 4'."""
    if not values:
        return "no"
    head = ", ".join(map(str, values[:-1]))
    return f"{head} or {values[-1]}" if head else str(values[-1])
