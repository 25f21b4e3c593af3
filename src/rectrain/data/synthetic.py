"""The default dataset: a seeded generator with the structure real logs have.

What a recommender can learn from it, and why each part is there:

* **power-law item popularity** (Zipf), so popularity is a strong baseline and logQ matters;
* **latent user tastes**: every user belongs to one of ``n_groups`` taste groups, each a
  distribution over item categories (the true group is kept in ``RawLog.extra`` so segment
  recovery can be measured);
* **item categories** as side features (for cold-start item towers);
* **timestamps with sessions**: short gaps inside a session, long gaps between sessions;
* **sequential structure**: inside a session the next item is, with probability ``p_follow``, one
  of a few fixed "successors" of the previous item, so a sequence model can beat a bag-of-items model.

Generation is vectorised over users (one loop over positions, never over users): 1M events take
about a second.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from rectrain.data.schema import ITEM, TIMESTAMP, USER, RawLog


def generate_synthetic(
    n_users: int = 2000,
    n_items: int = 1000,
    n_categories: int = 20,
    n_groups: int = 8,
    mean_length: float = 50.0,
    min_length: int = 5,
    max_length: int = 400,
    popularity_exponent: float = 1.0,
    taste_concentration: float = 0.3,
    n_successors: int = 3,
    p_follow: float = 0.5,
    p_new_session: float = 0.15,
    seed: int = 0,
) -> RawLog:
    """Generate an interaction log; see the module docstring for the structure.

    Args:
        n_users, n_items, n_categories, n_groups: sizes.
        mean_length: mean number of events per user (log-normal lengths, clipped to
            ``[min_length, max_length]``).
        popularity_exponent: Zipf exponent of item popularity (1.0 is typical of real catalogs).
        taste_concentration: Dirichlet concentration of each group's category preferences
            (small = sharply different groups).
        n_successors: how many fixed successor items every item has.
        p_follow: probability that the next event in a session is a successor of the previous one.
        p_new_session: probability that an event starts a new session (long time gap, no carry-over).
        seed: everything is a function of this seed.

    Returns:
        A RawLog with string ids, item titles/categories and ``extra["user_group"]`` (n_users,).
    """
    if min(n_users, n_items, n_categories, n_groups, n_successors) < 1:
        raise ValueError("sizes must be positive")
    rng = np.random.default_rng(seed)

    # --- items: category and popularity -------------------------------------------------------
    item_category = rng.integers(0, n_categories, size=n_items)
    popularity = 1.0 / np.arange(1, n_items + 1) ** popularity_exponent
    popularity = popularity[rng.permutation(n_items)]  # popular items spread over categories

    # Per-category inverse-CDF tables, concatenated: category c occupies the interval [c, c+1) of
    # the global cumulative axis, so one searchsorted samples "an item of category c by popularity".
    order = np.lexsort((np.arange(n_items), item_category))  # items grouped by category
    cat_of_sorted = item_category[order]
    weights = popularity[order]
    cat_totals = np.bincount(cat_of_sorted, weights=weights, minlength=n_categories)
    cat_totals[cat_totals == 0] = 1.0
    within = np.cumsum(weights) - np.concatenate([[0.0], np.cumsum(cat_totals)])[cat_of_sorted]
    global_cdf = cat_of_sorted + within / cat_totals[cat_of_sorted]  # increasing, in [c, c+1]
    has_items = np.bincount(item_category, minlength=n_categories) > 0

    def sample_items(categories: np.ndarray) -> np.ndarray:
        u = categories + rng.random(categories.shape[0]) * (1 - 1e-9)
        pos = np.searchsorted(global_cdf, u, side="left")
        return order[np.minimum(pos, n_items - 1)]

    # Successors: popular items of the same category (a "people who watched X then watch Y" chain).
    successors = sample_items(np.repeat(item_category, n_successors)).reshape(n_items, n_successors)
    for _ in range(3):  # an item is not its own successor (redraw the few that are)
        own = successors == np.arange(n_items)[:, None]
        if not own.any():
            break
        successors[own] = sample_items(np.broadcast_to(item_category[:, None], own.shape)[own])

    # --- users: taste groups ------------------------------------------------------------------
    group_pref = rng.dirichlet(np.full(n_categories, taste_concentration), size=n_groups)
    group_pref *= has_items  # never ask for an empty category
    group_pref /= group_pref.sum(1, keepdims=True)
    user_group = rng.integers(0, n_groups, size=n_users)
    # Each user's taste: a noisy copy of the group's (a Dirichlet draw around the group mean,
    # written as normalised gammas so it is vectorised over users).
    user_pref = rng.gamma(20.0 * group_pref[user_group] + 1e-3)
    user_pref *= has_items
    user_pref /= user_pref.sum(1, keepdims=True)
    user_cdf = np.cumsum(user_pref, axis=1)

    sigma = 0.8
    mu = np.log(max(mean_length, 1.0)) - sigma**2 / 2
    lengths = np.clip(np.round(rng.lognormal(mu, sigma, size=n_users)), min_length, max_length).astype(np.int64)

    # --- events, one position at a time for all users ------------------------------------------
    total = int(lengths.sum())
    users_out = np.empty(total, dtype=np.int64)
    items_out = np.empty(total, dtype=np.int64)
    times_out = np.empty(total, dtype=np.float64)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    clock = rng.uniform(0, 180 * 86400, size=n_users) + 1.6e9
    prev = np.full(n_users, -1, dtype=np.int64)
    for step in range(int(lengths.max())):
        active = np.flatnonzero(lengths > step)
        n = active.size
        new_session = (rng.random(n) < p_new_session) | (prev[active] < 0)
        follow = (~new_session) & (rng.random(n) < p_follow)
        # category from the user's taste, item by popularity within it
        cats = (user_cdf[active] < rng.random(n)[:, None]).sum(1)
        cats = np.minimum(cats, n_categories - 1)
        nxt = sample_items(cats)
        picked = successors[prev[active[follow]], rng.integers(0, n_successors, size=int(follow.sum()))]
        nxt[follow] = picked
        gap = np.where(new_session, rng.exponential(2 * 86400, size=n), rng.exponential(120, size=n))
        clock[active] += np.ceil(gap)
        pos = offsets[active] + step
        users_out[pos], items_out[pos], times_out[pos] = active, nxt, clock[active]
        prev[active] = nxt

    # Present events in time order, like a real log file (ties keep user order).
    by_time = np.argsort(times_out, kind="stable")
    interactions = pd.DataFrame(
        {
            USER: pd.Series(users_out[by_time]).astype(str).to_numpy(dtype=object),
            ITEM: pd.Series(items_out[by_time]).astype(str).to_numpy(dtype=object),
            TIMESTAMP: times_out[by_time],
        }
    )
    items = pd.DataFrame(
        {
            ITEM: np.arange(n_items).astype(str).astype(object),
            "title": [f"item {i} (cat{c})" for i, c in enumerate(item_category)],
            "categories": [[f"cat{c}"] for c in item_category],
        }
    )
    users = _user_table(user_group, n_groups, seed)
    source = f"synthetic(n_users={n_users}, n_items={n_items}, seed={seed})"
    extra = {"user_group": user_group, "item_category": item_category, "successors": successors}
    return RawLog(interactions=interactions, items=items, users=users, source=source, extra=extra)


def _user_table(user_group: np.ndarray, n_groups: int, seed: int) -> pd.DataFrame:
    """Demographics that hint at the taste group: ``age`` (group mean + noise) and ``region`` (the
    group's region for 60% of users, any other otherwise). Drawn from their own stream, so adding
    them left the events of every seed unchanged."""
    rng = np.random.default_rng([seed, 7])
    n = user_group.shape[0]
    age = np.clip(np.round(22 + 40 * user_group / max(n_groups - 1, 1) + rng.normal(0, 6, n)), 16, 90)
    n_regions = max(4, n_groups // 2)
    region = np.where(rng.random(n) < 0.6, user_group % n_regions, rng.integers(0, n_regions, n))
    return pd.DataFrame({USER: np.arange(n).astype(str).astype(object), "age": age.astype(np.int64),
                         "region": pd.Series([f"r{r}" for r in region], dtype=object)})
