"""Which rank counts which elements of a parameter, so that a sum over ranks sees each element once.

Weight sketches (parity.rank.digest) and logical probes (parity.rank.probes) both add up per-rank pieces of
a logical tensor with one all_reduce(SUM); this is the one rule for which pieces each rank adds.
"""

from __future__ import annotations

from parity.rank.parallelize import Parallel


def _shard_box_fn():
    """torch.distributed.tensor's compute_local_shape_and_global_offset, wherever this torch keeps it."""
    try:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    except ImportError:  # releases before DTensor moved out of torch.distributed._tensor
        from torch.distributed._tensor._utils import compute_local_shape_and_global_offset
    return compute_local_shape_and_global_offset


def held_box(p):
    """(local tensor, global offset) of what this rank holds of p: its shard of a DTensor (a replica
    included), or a plain tensor whole."""
    if not hasattr(p, "device_mesh"):
        return p, (0,) * p.dim()
    shape, offset = _shard_box_fn()(p.shape, p.device_mesh, p.placements)
    local = p.to_local()
    if tuple(local.shape) != tuple(shape):
        raise RuntimeError(f"shard of a parameter: local shard {tuple(local.shape)} is not the {tuple(shape)} "
                           f"that {p.placements} gives for {tuple(p.shape)}")
    return local, offset


def held_part(p) -> tuple:
    """(this rank's local tensor of p, the index of that part in p's full tensor): a shard, a stage's or all of it."""
    local, offset = held_box(p)
    return local, tuple(slice(o, o + n) for o, n in zip(offset, local.shape))


def local_box(p, par: Parallel):
    """(local tensor, global offset) when this rank is the one that counts p's local elements, else None.

    Every element of the logical tensor is counted on exactly one rank: a DTensor's Shard
    placements split it into disjoint boxes (their offsets from compute_local_shape_and_global_offset),
    and of the ranks that hold the same box, only the one at coordinate 0 of every replicating
    dim counts it. Replicating dims are the DTensor's Replicate dims and the dims of the setup's
    mesh the DTensor does not span (DDP and plain tensors span none), except pp: pipeline ranks
    hold different parameters, not copies.
    """
    world = par.mesh
    spanned = set()
    if hasattr(p, "device_mesh"):
        from torch.distributed.tensor import Replicate, Shard

        try:  # FSDP's shard of a TP shard; not a Shard subclass in every release
            from torch.distributed.tensor.placement_types import _StridedShard
        except ImportError:
            _StridedShard = Shard
        mesh = p.device_mesh
        spanned = set(mesh.mesh_dim_names or ())
        coord = mesh.get_coordinate()
        for dim, placement in enumerate(p.placements):
            if isinstance(placement, Replicate):
                if coord[dim] != 0:
                    return None
            elif not isinstance(placement, (Shard, _StridedShard)):
                raise RuntimeError(f"counting shards: parameter placement {placement} is neither Shard nor Replicate")
    local, offset = held_box(p)
    if world is not None:
        for name in world.mesh_dim_names:
            if name != "pp" and name not in spanned and world.get_local_rank(name) != 0:
                return None
    return local, offset
