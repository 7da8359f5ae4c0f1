"""Admission control, driven by random arrivals and completions: no limit is ever exceeded, and
nothing starves (every move starts once enough running moves finish)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from migrations_app.admission import Limits, Move, admit

HOSTS = [f"esx-{i:02d}" for i in range(4)]
STORES = [f"ds-{i}" for i in range(3)]
VCENTER = Limits()
SMALL = Limits.for_connection("libvirt", None)


@st.composite
def moves(draw, order: int) -> Move:
    kind = draw(st.sampled_from(["compute", "storage", "both"]))
    source = draw(st.sampled_from(HOSTS))
    target = draw(st.sampled_from([h for h in HOSTS if h != source])) if kind != "storage" else None
    return Move(
        id=order, kind=kind, source_host=source, target_host=target,
        datastores=frozenset(draw(st.sets(st.sampled_from(STORES), min_size=1, max_size=2))),
        target_datastore=draw(st.sampled_from(STORES)) if kind != "compute" else None,
        priority=draw(st.integers(0, 1)), order=order,
    )


def usage(running, limits):
    use: dict = {}
    for move in running:
        for res, cost in move.costs(limits).items():
            use[res] = use.get(res, 0) + cost
    return use


def assert_within(running, limits):
    maxima = {"host": limits.host_max, "datastore": limits.datastore_max, "network": limits.network_max}
    for res, used in usage(running, limits).items():
        assert used <= maxima[res[0]], (res, used)


@settings(max_examples=200, deadline=None)
@given(data=st.data(), limits=st.sampled_from([VCENTER, SMALL]))
def test_random_arrivals_and_completions_never_exceed_a_limit_and_nothing_starves(data, limits):
    running: list[Move] = []
    queued: list[Move] = []
    order = 0
    for _ in range(data.draw(st.integers(5, 60), label="steps")):
        if data.draw(st.booleans(), label="arrive?") or not running:
            queued.append(data.draw(moves(order), label="move"))
            order += 1
        else:
            running.remove(data.draw(st.sampled_from(running), label="finish"))
        decision = admit(running, queued, limits)
        for move in decision.admitted:
            queued.remove(move)
            running.append(move)
        assert_within(running, limits)
        assert set(decision.waiting) == {m.id for m in queued}
        assert all(decision.waiting[m.id] for m in queued)
    # No more arrivals: completions alone must drain the queue (no move waits forever).
    for _ in range(10 * (len(queued) + len(running)) + 10):
        if not queued:
            break
        if running:
            running.pop(0)
        for move in admit(running, queued, limits).admitted:
            queued.remove(move)
            running.append(move)
        assert_within(running, limits)
    assert not queued, f"starved: {queued}"


def test_a_big_move_is_not_overtaken_by_later_small_ones():
    limits = Limits()  # vCenter: host max 8, storage 4, compute 1
    running = [Move(1, "storage", "esx-01", datastores=frozenset({"ds-a"}), target_datastore="ds-b"),
               Move(2, "compute", "esx-01", "esx-02", frozenset({"ds-c"}), order=1),
               Move(3, "compute", "esx-01", "esx-03", frozenset({"ds-c"}), order=2),
               Move(4, "compute", "esx-01", "esx-03", frozenset({"ds-c"}), order=3)]
    big = Move(5, "storage", "esx-01", datastores=frozenset({"ds-d"}), target_datastore="ds-e", order=4)
    small = Move(6, "compute", "esx-01", "esx-02", frozenset({"ds-c"}), order=5)
    decision = admit(running, [big, small], limits)
    assert decision.admitted == []  # 7 of 8 in use: big does not fit, small would, but may not overtake
    assert decision.waiting[5] == "host esx-01: cost 7 of 8 in use (3 compute moves running, 1 storage move running)"
    assert decision.waiting[6] == "host esx-01: waiting behind request #5"
    assert decision.place == {5: 1, 6: 2}


def test_connection_options_override_the_defaults():
    limits = Limits.for_connection("libvirt", {"admission": {"host_max": 5, "bogus": 1}})
    assert limits.host_max == 5 and limits.datastore_max == 4
    assert Limits.for_connection("vcenter", None) == Limits()
