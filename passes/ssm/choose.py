"""Which layers to convert: measured, when the user asks for "auto" or to keep some attention.

Each candidate layer, already aligned with the attention it replaces, is swapped into the
original model alone and the perplexity on held-out text measured: its damage. Layers are
then converted least damaging first, as many as keep the perplexity of all of them together
within the budget ("auto"), or all but the `keep_attention` most damaging.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch
from tqdm.auto import tqdm

from flashc.passes.ssm.convert import AttentionSite


@contextmanager
def swapped(sites: list[AttentionSite], modules: dict[int, torch.nn.Module], layers: list[int]):
    """The model of `sites` with the listed layers' attention replaced by modules[i], restored after."""
    old = {i: sites[i].module for i in layers}
    try:
        for i in layers:
            setattr(sites[i].parent, sites[i].name, modules[i])
        yield
    finally:
        for i, m in old.items():
            setattr(sites[i].parent, sites[i].name, m)


def choose(sites: list[AttentionSite], modules: dict[int, torch.nn.Module], measure: Callable[[], float],
           baseline: float, budget: float, keep_attention: int, auto: bool, progress: bool = True
           ) -> tuple[list[int], list[dict]]:
    """(layers to convert, one row per candidate: layer, perplexity alone, chosen)."""
    candidates = sorted(modules)
    damage = {}
    for i in tqdm(candidates, desc="ssm: damage per layer", unit="layer", disable=not progress):
        with swapped(sites, modules, [i]):
            damage[i] = measure()
    order = sorted(candidates, key=lambda i: damage[i])
    count = max(0, len(order) - keep_attention)
    measured_sets = {}
    if auto:  # the longest prefix of `order` within the budget (perplexity grows with each layer added)
        limit = baseline * (1 + budget)
        lo, hi = 0, count
        while lo < hi:
            mid = (lo + hi + 1) // 2
            with swapped(sites, modules, order[:mid]):
                measured_sets[mid] = measure()
            if measured_sets[mid] <= limit:
                lo = mid
            else:
                hi = mid - 1
        count = lo
    chosen = sorted(order[:count])
    rows = [{"layer": i, "perplexity_alone": damage[i], "rank": order.index(i) + 1, "converted": i in chosen}
            for i in candidates]
    for k, ppl in sorted(measured_sets.items()):
        rows.append({"first_k": k, "perplexity_together": ppl})
    return chosen, rows
