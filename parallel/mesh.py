"""Parallel degrees, validated once, and the one named ``DeviceMesh`` built from them.

Rank layout (row-major): rank = d·cp + c, so each context-parallel group is ``cp`` consecutive ranks
(intra-node where possible). For the hybrid strategy the cp dimension is split into
(``cp_ring``, ``cp_ulysses``): c = g·U + u, so Ulysses groups are U consecutive ranks (the
all-to-all stays on the fastest links) and ring groups are strided.

    dims = ParallelDims(dp=-1, cp=4, world_size=8, ulysses_degree=2)
    mesh = dims.build_mesh("cpu")               # dims ("dp", "cp_ring", "cp_ulysses") + flattened "cp"
    cp_group = dims.group(mesh, "cp")
    ParallelDims.get_group(mesh, "ep")          # None for an axis of size 1 (or without a mesh)
    cp_attention(q, k, v, group=ParallelDims.cp_groups(mesh), strategy="hybrid", ulysses_degree=2, ...)

Named groups: ``dp``, ``cp``, ``cp_ring``, ``cp_ulysses`` (mesh dimensions), ``ep`` (the ranks MoE experts
are split over: the cp dimension) and ``dp_cp`` (all ranks that replicate parameters).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from .comm import CPGroup

__all__ = ["GROUP_NAMES", "ParallelDims"]

GROUP_NAMES = ("dp", "cp", "cp_ring", "cp_ulysses", "ep", "dp_cp")


@dataclass(kw_only=True, slots=True)
class ParallelDims:
    """Data- and context-parallel degrees of a job."""

    world_size: int
    """Total ranks (WORLD_SIZE)."""
    dp: int = -1
    """Data-parallel degree; -1 = world_size / cp."""
    cp: int = 1
    """Context-parallel degree (ranks splitting each sequence)."""
    ulysses_degree: int | None = None
    """Hybrid strategy: ranks per Ulysses group inside cp (consecutive); None = no split."""

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {self.world_size}")
        if self.cp < 1:
            raise ValueError(f"parallel.cp must be >= 1, got {self.cp}")
        if self.dp == -1:
            if self.world_size % self.cp != 0:
                raise ValueError(
                    f"parallel.cp={self.cp} does not divide WORLD_SIZE ({self.world_size}); dp=-1 cannot be "
                    "resolved — choose cp dividing the number of ranks"
                )
            self.dp = self.world_size // self.cp
        if self.dp < 1:
            raise ValueError(f"parallel.dp must be >= 1 or -1 (auto), got {self.dp}")
        if self.dp * self.cp != self.world_size:
            raise ValueError(
                f"dp * cp != WORLD_SIZE ({self.dp} * {self.cp} != {self.world_size}); set parallel.dp=-1 to use "
                "every rank"
            )
        if self.ulysses_degree is not None:
            u = self.ulysses_degree
            if u < 1 or self.cp % u != 0:
                raise ValueError(
                    f"parallel.ulysses_degree={u} must divide parallel.cp={self.cp} (Ulysses groups of consecutive "
                    "ranks inside each context-parallel group)"
                )

    @property
    def ring_degree(self) -> int:
        """Ring groups per context-parallel group (cp / ulysses_degree)."""
        return self.cp // (self.ulysses_degree or 1)

    @property
    def hybrid(self) -> bool:
        return self.ulysses_degree is not None and 1 < self.ulysses_degree < self.cp

    @property
    def dim_names(self) -> tuple[str, ...]:
        return ("dp", "cp_ring", "cp_ulysses") if self.hybrid else ("dp", "cp")

    def build_mesh(self, device_type: str = "cpu") -> DeviceMesh:
        """The job's DeviceMesh (``torch.distributed`` must be initialized with ``world_size`` ranks).

        Dims ``("dp", "cp")``, or ``("dp", "cp_ring", "cp_ulysses")`` plus a flattened ``"cp"`` for hybrid
        (whose Ulysses groups :meth:`cp_groups` hands to ``cp_attention``).
        """
        if dist.get_world_size() != self.world_size:
            raise ValueError(f"ParallelDims.world_size={self.world_size} but torch.distributed has "
                             f"{dist.get_world_size()} ranks")
        if not self.hybrid:
            return init_device_mesh(device_type, (self.dp, self.cp), mesh_dim_names=("dp", "cp"))
        u = int(self.ulysses_degree)  # type: ignore[arg-type]
        mesh = init_device_mesh(device_type, (self.dp, self.cp // u, u), mesh_dim_names=self.dim_names)
        mesh["cp_ring", "cp_ulysses"]._flatten("cp")
        return mesh

    @staticmethod
    def group(mesh: DeviceMesh, name: str) -> dist.ProcessGroup:
        """The process group of dimension ``name`` (``dp``, ``cp``, ``cp_ring``, ``cp_ulysses``) on this rank."""
        names = mesh.mesh_dim_names or ()
        if name not in names and name != "cp":
            raise ValueError(f"mesh has no dimension {name!r}; it has {', '.join(names)}")
        return mesh[name].get_group()

    @staticmethod
    def ranks(mesh: DeviceMesh, name: str) -> list[int]:
        """Global ranks in this rank's group of dimension ``name``."""
        return list(dist.get_process_group_ranks(ParallelDims.group(mesh, name)))

    @staticmethod
    def get_group(mesh: DeviceMesh | None, name: str) -> dist.ProcessGroup | None:
        """This rank's group named ``name`` (:data:`GROUP_NAMES`), or None for an unused axis.

        ``dp``, ``cp``, ``cp_ring``, ``cp_ulysses``, ``ep``: None without a mesh or when the axis has one
        rank (``cp_ring``/``cp_ulysses`` exist only for the hybrid strategy). ``dp_cp``: every rank of the
        mesh (WORLD when it spans the world); None only without a mesh or a process group.
        """
        if name not in GROUP_NAMES:
            raise ValueError(f"no parallel group {name!r}; choose one of {', '.join(GROUP_NAMES)}")
        if mesh is None:
            return None
        if name == "dp_cp":
            if not dist.is_initialized():
                return None
            if mesh.size() == dist.get_world_size():
                return dist.group.WORLD
            return mesh._flatten("dp_cp").get_group()
        dim = "cp" if name == "ep" else name
        if dim not in (mesh.mesh_dim_names or ()) and dim != "cp":
            return None
        sub = mesh[dim]
        return None if sub.size() == 1 else sub.get_group()

    @staticmethod
    def cp_groups(mesh: DeviceMesh | None) -> CPGroup | None:
        """The cp group with its Ulysses sub-group (hybrid meshes), for ``cp_attention``; None: cp = 1."""
        group = ParallelDims.get_group(mesh, "cp")
        if group is None:
            return None
        return CPGroup(group=group, ulysses=ParallelDims.get_group(mesh, "cp_ulysses"))
