"""The one ordering every search result follows: ascending distance, ties to the smaller id.

Tiles of one search, the candidates of a query's second pass and the shards of a distributed
index all merge through :func:`lex_smallest` (candidates in rows) or :func:`lex_smallest_grouped`
(candidates scattered over queries), so they cannot disagree on ties.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["lex_smallest", "lex_smallest_grouped"]


def lex_smallest(dist: Tensor, ids: Tensor, k: int) -> Tensor:
    """Column indices of the ``k`` smallest ``(dist, id)`` pairs of each row, in order.

    Args:
        dist: ``[r, m]`` distances (``+inf`` for padding).
        ids: ``[r, m]`` the ids that break ties.
        k: how many to keep, ``k <= m``.
    """
    order = ids.argsort(dim=1, stable=True)
    by_dist = dist.gather(1, order).argsort(dim=1, stable=True)
    return order.gather(1, by_dist)[:, :k]


def lex_smallest_grouped(who: Tensor, dist: Tensor, ids: Tensor, groups: int, k: int) -> Tensor:
    """Positions of each group's ``k`` smallest ``(dist, id)`` pairs, group by group, in order.

    Args:
        who: ``[p]`` group (query) of each candidate, in ``0 .. groups-1``; every group must
            have at least ``k`` candidates (pad with ``+inf``).
        dist: ``[p]`` distances.
        ids: ``[p]`` the ids that break ties.
        groups: the number of groups.
        k: how many to keep per group.

    Returns:
        ``[groups * k]`` positions into the candidates: group 0's ``k`` first.
    """
    order = ids.argsort(stable=True)
    order = order[dist[order].argsort(stable=True)]
    order = order[who[order].argsort(stable=True)]
    sorted_who = who[order]
    first = torch.searchsorted(sorted_who, torch.arange(groups, device=who.device))
    rank = torch.arange(order.numel(), device=who.device) - first[sorted_who]
    return order[rank < k]
