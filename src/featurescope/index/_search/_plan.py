"""How one search is cut into tiles so that its temporaries fit the memory budget."""

from __future__ import annotations

import math
from dataclasses import dataclass

from featurescope.index._search._config import SearchConfig
from featurescope.index._search._gallery import NORM_CELLS

__all__ = ["DEFAULT_CONFIG", "GROUP", "TilePlan", "plan_tiles"]

#: Group size of the two-level selection (minimum of each group, then top-k of the minima).
GROUP = 16
DEFAULT_CONFIG = SearchConfig()


@dataclass(frozen=True)
class TilePlan:
    """How one search is cut into tiles so its temporaries fit ``memory_budget`` bytes."""

    query_tile: int
    gallery_tile: int
    keep: int
    dim: int
    upcast: bool  # gallery tiles are copied to float32 before the product
    fresh_norms: bool = False  # each tile's squared norms are computed (gallery on disk)
    low_precision: bool = False  # the product runs in bfloat16 (a tile copy and its output)
    merge_every: int = 16  # candidate blocks buffered per query (SearchConfig.merge_every)

    def scan_bytes(self) -> int:
        """Peak bytes of the fast pass's temporaries for one query tile."""
        bq, bn, keep = self.query_tile, self.gallery_tile, self.keep
        block = 4 * bq * bn  # the float32 score block
        minima = 4 * bq * (bn // GROUP + 1)
        select = bq * keep * GROUP * (8 + 4) + bq * keep * 3 * (8 + 4)
        buffered = bq * keep * (self.merge_every + 1) * (4 + 8)
        upcast = 4 * bn * self.dim if self.upcast else 0
        query = 4 * bq * self.dim
        fresh = (
            8 * min(bn * self.dim, max(self.dim, NORM_CELLS)) + 4 * bn if self.fresh_norms else 0
        )
        low = 2 * bq * bn + 2 * bn * self.dim + 2 * bq * self.dim if self.low_precision else 0
        return block + minima + select + buffered + upcast + query + fresh + low


def plan_tiles(
    nq: int,
    nb: int,
    dim: int,
    keep: int,
    budget: int,
    *,
    upcast: bool = False,
    device_type: str = "cpu",
    fresh_norms: bool = False,
    low_precision: bool = False,
    config: SearchConfig = DEFAULT_CONFIG,
) -> TilePlan:
    """Choose tile sizes whose temporaries stay within ``budget`` bytes.

    On the CPU a score block holds about ``config.block_cells`` floats, so it stays in cache
    between the product that writes it and the selection that reads it. Its shape follows
    ``dim``: long vectors make the product dominate and want many queries per tile (the
    product packs each gallery panel once per tile); short ones make the selection matter and
    want wide gallery tiles (selection costs less per score on wide rows). A GPU takes blocks
    as large as the budget allows. Few queries let gallery tiles grow instead.

    Raises:
        ValueError: if even a 1 × ``keep`` tile does not fit.
    """
    nq, nb = max(nq, 1), max(nb, 1)
    if device_type == "cpu":
        cells = config.block_cells
        bq_pref = min(1024, max(256, 1 << round(math.log2(max(dim, 1)))))
        bn_pref = max(config.gallery_tile, cells // bq_pref)
    else:
        cells = 64 * config.block_cells
        bq_pref, bn_pref = 8192, 4 * config.gallery_tile
    bn = min(nb, bn_pref)
    extra = (fresh_norms, low_precision, config.merge_every)
    while True:
        plan = TilePlan(1, bn, keep, dim, upcast, *extra)
        if plan.scan_bytes() <= budget or bn <= keep:
            break
        bn = max(keep, bn // 2)
    if plan.scan_bytes() > budget:
        raise ValueError(f"memory_budget={budget} bytes is too small for one query (dim={dim})")
    per_row = TilePlan(2, bn, keep, dim, upcast, *extra).scan_bytes() - plan.scan_bytes()
    bq = min(nq, bq_pref, 1 + (budget - plan.scan_bytes()) // max(per_row, 1))
    while bn < nb:
        wider = TilePlan(bq, min(nb, 2 * bn), keep, dim, upcast, *extra)
        if bq * wider.gallery_tile > cells or wider.scan_bytes() > budget:
            break
        bn = wider.gallery_tile
    return TilePlan(bq, bn, keep, dim, upcast, *extra)
