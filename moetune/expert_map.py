"""Expert parallelism as vLLM names it: an expert map (global expert id -> local index, -1 for
an expert another rank holds) checked once per map tensor, and the routing mapped through it."""

from __future__ import annotations

import weakref

import torch

# Expert maps whose values were read and found good, by id (a tensor's == compares values).
_checked_maps: dict[int, weakref.ref] = {}


def _map_checked(expert_map: torch.Tensor) -> bool:
    known = _checked_maps.get(id(expert_map))
    return known is not None and known() is expert_map


def check_expert_map(expert_map: torch.Tensor | None, global_num_experts: int | None, w1: torch.Tensor) -> int:
    """The global expert count, after checking the expert map names local experts only.

    The values are read (one sync) once per map tensor, and only outside CUDA-graph capture,
    where a read would break the capture; the layer itself never needs them on the host.
    """
    local = w1.shape[0] if isinstance(w1, torch.Tensor) and w1.dim() == 3 else 0
    if global_num_experts is not None and (isinstance(global_num_experts, bool)
                                           or not isinstance(global_num_experts, int) or global_num_experts < 1):
        raise ValueError(f"global_num_experts must be a positive int, got {global_num_experts!r}")
    if expert_map is None:
        if global_num_experts not in (None, -1, local):
            raise ValueError(f"global_num_experts = {global_num_experts} differs from the {local} experts of w1: "
                             "pass the expert_map that says which of them are local")
        return local
    if not isinstance(expert_map, torch.Tensor):
        raise ValueError(f"expert_map must be a 1-D int32/int64 tensor [global_num_experts], got "
                         f"{type(expert_map).__name__}")
    if expert_map.dim() != 1 or expert_map.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"expert_map must be a 1-D int32/int64 tensor [global_num_experts], got "
                         f"{expert_map.dtype} {tuple(expert_map.shape)}")
    global_experts = expert_map.numel() if global_num_experts is None else global_num_experts
    if expert_map.numel() != global_experts:
        raise ValueError(f"expert_map has {expert_map.numel()} entries but global_num_experts = {global_experts}")
    if global_experts < local:
        raise ValueError(f"global_num_experts = {global_experts} is less than the {local} local experts of w1")
    # A rank's map is fixed: its values are read (a host sync) once per tensor, not per call.
    capturing = expert_map.is_cuda and torch.cuda.is_current_stream_capturing()
    if not capturing and expert_map.numel() and not _map_checked(expert_map):
        low, high = int(expert_map.min()), int(expert_map.max())
        if low < -1 or high >= local:
            raise ValueError(f"expert_map values must be -1 (another rank) or local ids in [0, {local}), "
                             f"got values in [{low}, {high}]")
        key = id(expert_map)
        _checked_maps[key] = weakref.ref(expert_map, lambda _: _checked_maps.pop(key, None))
    return global_experts


def local_expert_ids(topk_ids: torch.Tensor, expert_map: torch.Tensor) -> torch.Tensor:
    """Global expert ids -> local ids, -1 for experts on other ranks (and for ids past the map)."""
    ids = topk_ids.long()
    inside = (ids >= 0) & (ids < expert_map.numel())
    local = expert_map.to(ids.device)[ids.clamp(0, max(expert_map.numel() - 1, 0))]
    return torch.where(inside, local, torch.full_like(local, -1)).to(torch.int32)


def rank_expert_map(local_experts: int, global_experts: int, rank: int = 0, device=None) -> torch.Tensor:
    """The expert map of `rank` when each rank holds `local_experts` consecutive experts of
    `global_experts`: global id -> local id, -1 for the other ranks' (vLLM's default placement)."""
    expert_map = torch.full((global_experts,), -1, dtype=torch.int32, device=device)
    first = rank * local_experts
    expert_map[first:first + local_experts] = torch.arange(local_experts, dtype=torch.int32, device=device)
    return expert_map
