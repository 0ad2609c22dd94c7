"""flashc_testing.all_pairs: the pairwise cases the interpreted kernel tests run cover every pair of values."""

import itertools
import random

from flashc_testing import all_pairs


def test_every_pair_of_values_meets_in_some_row_and_where_is_respected():
    rng = random.Random()
    for _ in range(20):
        factors = {f"f{i}": [f"v{i}.{j}" for j in range(rng.randint(1, 5))] for i in range(rng.randint(1, 4))}
        banned = {tuple(rng.choice(v) for v in factors.values())}
        where = lambda *row: row not in banned  # noqa: E731
        rows = all_pairs(where, **factors)
        allowed = [r for r in itertools.product(*factors.values()) if where(*r)]
        assert set(rows) <= set(allowed) and len(rows) <= len(allowed)
        for i, j in itertools.combinations(range(len(factors)), 2):
            assert {(r[i], r[j]) for r in allowed} == {(r[i], r[j]) for r in rows}
        assert all_pairs(where, **factors) == rows  # the same cases every run
        if len(factors) == 1:
            assert rows == allowed


def test_four_factors_need_far_fewer_rows_than_their_product():
    rows = all_pairs(config=list(range(9)), dtype=[0, 1, 2], per_feature=[0, 1], sparsity=[0, 1, 2, 3])
    assert 36 <= len(rows) <= 45  # the two largest factors alone need 9 x 4; the product is 216
