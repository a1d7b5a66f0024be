import pytest

from mach_runtime.io.eviction import LRFUPolicy, LRUPolicy, make_policy


def test_lru_evicts_least_recently_used():
    p = LRUPolicy()
    for used in ([1, 2], [3], [1]):
        p.step(used)
    assert p.victim(exclude=set()) == 2
    assert p.victim(exclude={2}) == 3
    p.remove(2)
    assert p.victim(exclude=set()) == 3


def test_lrfu_keeps_frequently_used_expert_that_lru_would_drop():
    # expert 7 is used at each of 10 steps (beside one-off experts 100..109), then 9, 20, 21 once each
    seq = [[7, 100 + i] for i in range(10)] + [[9], [20], [21]]
    lru, lrfu = LRUPolicy(), LRFUPolicy()
    for p in (lru, lrfu):
        for used in seq:
            p.step(used)
        for k in range(100, 110):
            p.remove(k)
    # resident now: 7, 9, 20, 21; the step needs 20 and 21
    assert lru.victim(exclude={20, 21}) == 7  # least recently used
    assert lrfu.victim(exclude={20, 21}) == 9  # 7's frequency outweighs 9's slightly newer single use


def test_lrfu_forgets_old_frequency():
    p = LRFUPolicy(lam=0.5)
    for _ in range(5):
        p.step([1])
    for _ in range(30):
        p.step([2])
    p.step([3])
    assert p.victim(exclude={3}) == 1  # 1 was hot long ago; 2 is hot now


def test_lrfu_remembers_an_evicted_experts_history():
    """An expert evicted after heavy use and then used once again resumes its history: it outranks an expert used
    once, later. (Forgetting on eviction, as the bank did before, would evict the returning expert here.)"""
    p = LRFUPolicy(lam=0.02)
    for _ in range(10):
        p.step([1])
    p.remove(1)  # evicted
    p.step([1])  # needed again: read back in
    p.step([2])
    p.step([3])
    assert p.victim(exclude={3}) == 2
    p.remove(2)
    assert p.victim(exclude=set()) == 3  # a single recent use vs C(1) ~ 10


def test_lrfu_lambda_from_config(monkeypatch):
    from mach_runtime.config import resolve_lrfu_lambda
    from mach_runtime.errors import ConfigError

    monkeypatch.setenv("MACH_LRFU_LAMBDA", "1")  # lam 1: the same ranking as LRU
    assert make_policy("lrfu").table.lam == 1.0
    p = make_policy("lrfu")
    for used in ([1], [1], [1], [2], [3]):
        p.step(used)
    assert p.victim(exclude={3}) == 1  # lam 1 ranks like LRU: three old uses weigh less than one newer
    assert resolve_lrfu_lambda(0.5) == 0.5  # an argument wins over the environment
    for bad in ("0", "1.5", "fast"):
        monkeypatch.setenv("MACH_LRFU_LAMBDA", bad)
        with pytest.raises(ConfigError, match="MACH_LRFU_LAMBDA"):
            make_policy("lrfu")


def test_victim_never_in_exclude():
    for name in ("lru", "lrfu"):
        p = make_policy(name)
        p.step([1, 2])
        with pytest.raises(RuntimeError):
            p.victim(exclude={1, 2})


def test_lrfu_rejects_bad_lambda():
    with pytest.raises(ValueError):
        LRFUPolicy(lam=0)


@pytest.mark.parametrize("name", ["lru", "lrfu"])
def test_table_steps_many_banks_at_once_as_one_by_one(name):
    """``PolicyTable.step_rows`` (one array update for a decode step of every layer) equals stepping each bank's
    policy on its own: same state, same victims."""
    import numpy as np

    from mach_runtime.io.eviction import make_table

    rng = np.random.default_rng(0)
    fast, slow = make_table(name, 3, 16), make_table(name, 3, 16)
    rows = [slow.row(b) for b in range(3)]
    for _ in range(40):
        used = np.stack([np.sort(rng.choice(16, 4, replace=False)) for _ in range(3)])
        fast.step_rows(np.arange(3), used)
        for b in range(3):
            rows[b].step(used[b].tolist())
        b, e = int(rng.integers(3)), int(rng.integers(16))
        if fast.tracked[b, e]:
            fast.remove(b, e)
            rows[b].remove(e)
    assert np.array_equal(fast.tracked, slow.tracked) and np.array_equal(fast.score, slow.score)
    for b in range(3):
        excl = set(rng.choice(16, 3, replace=False).tolist())
        assert fast.victim(b, excl) == rows[b].victim(excl)
