import numpy as np

from rectrain.data.synthetic import generate_synthetic


def test_seeded_and_structured():
    a = generate_synthetic(n_users=300, n_items=200, seed=3)
    b = generate_synthetic(n_users=300, n_items=200, seed=3)
    c = generate_synthetic(n_users=300, n_items=200, seed=4)
    assert a.interactions.equals(b.interactions)
    assert not a.interactions.equals(c.interactions)
    frame = a.interactions
    assert list(frame.columns) == ["user", "item", "timestamp"]
    assert frame["user"].map(type).eq(str).all()
    assert np.all(np.diff(frame["timestamp"].to_numpy()) >= 0)  # a log in time order
    assert a.extra["user_group"].shape == (300,)
    assert len(a.items) == 200 and all(len(c) == 1 for c in a.items["categories"])


def test_power_law_popularity():
    frame = generate_synthetic(n_users=2000, n_items=1000, seed=0).interactions
    counts = np.sort(frame["item"].value_counts().to_numpy())[::-1]
    top_share = counts[:10].sum() / counts.sum()
    assert top_share > 0.10  # 1% of items take over 10% of events
    assert counts[-1] < counts[0] / 50


def test_sequential_structure_is_learnable():
    """The next item is far more often a successor of the previous one than chance allows."""
    log = generate_synthetic(n_users=1000, n_items=500, p_follow=0.5, seed=1)
    frame = log.interactions.assign(user=lambda f: f["user"].astype(int), item=lambda f: f["item"].astype(int))
    frame = frame.sort_values(["user", "timestamp"], kind="stable")
    prev, nxt, same = frame["item"].to_numpy()[:-1], frame["item"].to_numpy()[1:], frame["user"].to_numpy()
    same_user = same[:-1] == same[1:]
    succ = log.extra["successors"]
    is_succ = (succ[prev[same_user]] == nxt[same_user][:, None]).any(1)
    assert is_succ.mean() > 0.3  # p_follow * P(same session) ~ 0.42; chance would be ~0.01


def test_million_events_in_seconds():
    import time

    t = time.perf_counter()
    log = generate_synthetic(n_users=20000, n_items=20000, mean_length=50, seed=0)
    assert len(log.interactions) > 900_000
    assert time.perf_counter() - t < 15
