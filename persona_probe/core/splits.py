"""The one seeded splitter: train/test by group, so every item of a group (a question under several system
prompts, a record's tokens) lands on the same side, and held-out scores are on unseen groups.

`grouped_folds` is its k-fold sibling for cross-validation (same idea: whole groups per fold).
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable, Sequence

import numpy as np
import torch


def seeded_split(groups: Sequence[Hashable], test_frac: float, seed: int, *, by_hash: bool = False
                 ) -> tuple[list[int], list[int]]:
    """(train indices, test indices) into `groups`, one group value per item.

    The distinct groups are sorted, put in a seeded order, and the first max(1, round(n_groups * test_frac))
    (0 when there is a single group) go to test. The order is a torch permutation seeded by `seed`, or with
    `by_hash` the groups sorted by sha256("{seed}:{group}"): then a group's side does not move when other groups
    are added or removed. Both are independent of the items' order in `groups`.
    """
    uniq = sorted(set(groups))
    if by_hash:
        order = sorted(uniq, key=lambda x: hashlib.sha256(f"{seed}:{x}".encode()).hexdigest())
    else:
        order = [uniq[i] for i in torch.randperm(len(uniq), generator=torch.Generator().manual_seed(seed)).tolist()]
    n_test = max(1, round(len(uniq) * test_frac)) if len(uniq) > 1 else 0
    test_groups = set(order[:n_test])
    train = [i for i, g in enumerate(groups) if g not in test_groups]
    test = [i for i, g in enumerate(groups) if g in test_groups]
    return train, test


def grouped_folds(groups: Sequence[Hashable], k: int, seed: int) -> list[int]:
    """Fold index (0..k-1) per item; all items of a group share a fold (seeded permutation of the groups,
    dealt round-robin)."""
    uniq = sorted(set(groups))
    perm = np.random.default_rng(seed).permutation(len(uniq)).tolist()
    fold_of = {uniq[g]: r % k for r, g in enumerate(perm)}
    return [fold_of[g] for g in groups]
