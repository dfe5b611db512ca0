"""``store/markers.py``: ids ``<epoch>.<seq>`` and the floor a process passes to each settlement."""

from __future__ import annotations

from guardproxy.store.markers import NO_EPOCH, Seqs, epoch_from, epoch_of, parse


def test_ids_of_an_epoch_and_the_others() -> None:
    assert epoch_from(3) // 1_000_000 == 3 and epoch_from(4) > epoch_from(3)  # the counter first, 6 random digits
    assert parse("12.345") == (12, 345)
    assert epoch_of("12.345") == 12
    for other in ("0123456789abcdef0123456789abcdef", "rebuild:abc", "ext:1.2", "1.2.3", "1.", ".2", "a.2"):
        assert parse(other) is None and epoch_of(other) == NO_EPOCH


def test_the_floor_is_the_lowest_seq_that_can_still_settle() -> None:
    seqs = Seqs(5, 0.0)
    ids = [seqs.take() for _ in range(4)]
    assert ids == ["5.1", "5.2", "5.3", "5.4"]
    assert seqs.floor(0.0) == 1
    seqs.release("5.2")
    assert seqs.floor(0.0) == 1  # 5.1 still runs
    assert seqs.floor(0.0, settling="5.1") == 3  # its own settle may pass it (marked in the same script)
    seqs.release("5.1")
    assert seqs.floor(0.0) == 3
    seqs.release("5.4")
    seqs.release("6.3")  # another epoch's id: not this process's to release
    assert seqs.floor(0.0) == 3
    seqs.release("5.3")
    assert seqs.floor(0.0) == 5 and seqs.held() == 0  # nothing in flight: every seq handed out is under it
    assert seqs.owns("5.9") == 9 and seqs.owns("6.9") is None


def test_behind_sentinel_the_floor_is_the_one_of_a_window_ago() -> None:
    seqs = Seqs(1, 100.0, window_s=30.0)
    for _ in range(3):
        seqs.release(seqs.take())
    assert seqs.floor(101.0) == 1  # younger than the window: no mark raised
    seqs.release(seqs.take())  # floor 5 from now on
    assert seqs.floor(129.0) == 1
    assert seqs.floor(131.5) == 4  # the floor seen at 101.0, a window ago
    assert seqs.floor(131.5, settling="1.4") == 4
    assert seqs.floor(200.0) == 5


def test_a_long_call_holds_the_floor_while_thousands_settle_past_it() -> None:
    seqs = Seqs(2, 0.0)
    long_call = seqs.take()
    for _ in range(5_000):
        seqs.release(seqs.take())
    assert seqs.floor(0.0) == 1 and seqs.held() == 1
    assert len(seqs._heap) <= 2 * seqs.held() + 1024  # the released ones do not pile up behind it
    seqs.release(long_call)
    assert seqs.floor(0.0) == 5_002
