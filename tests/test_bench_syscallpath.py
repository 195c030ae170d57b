"""bench/syscallpath.py's arithmetic: batches sorted into the windows between switches,
each "on" window judged against its "off" neighbours."""

from __future__ import annotations

import pytest

from bench.syscallpath import SETTLE_NS, Batch, Window, paired_deltas, parse_batch, windows

S = 1_000_000_000


def test_parse_batch_reads_the_workloads_line() -> None:
    assert parse_batch("100 250 1203.5 1190.0\n") == Batch(100, 250, 1203.5, 1190.0)


def test_batches_go_to_the_window_they_lie_wholly_in() -> None:
    periods = [(0, 2 * S, False), (2 * S, 4 * S, True)]
    batches = [
        Batch(SETTLE_NS, S // 2, 100.0, 90.0),              # off
        Batch(S, S + S // 2, 110.0, 95.0),                  # off
        Batch(2 * S - S // 10, 2 * S + S // 10, 999.0, 999.0),  # straddles the switch
        Batch(2 * S + SETTLE_NS // 2, 3 * S, 888.0, 888.0),    # starts while settling
        Batch(3 * S, 3 * S + S // 2, 150.0, 140.0),        # on
        Batch(5 * S, 6 * S, 1.0, 1.0),                      # after the last switch
    ]
    assert windows(batches, periods) == [Window(False, 105.0, 92.5, 2),
                                          Window(True, 150.0, 140.0, 1)]


def test_a_window_without_batches_is_left_out() -> None:
    periods = [(0, S, False), (S, 2 * S, True)]
    assert windows([Batch(SETTLE_NS, S, 5.0, 5.0)], periods) == [Window(False, 5.0, 5.0, 1)]


def test_a_batch_overlapping_the_switching_between_periods_is_left_out() -> None:
    periods = [(0, S, False), (2 * S, 3 * S, True)]  # switching took from 1 s to 2 s
    batches = [Batch(S - S // 10, S + S // 10, 9.0, 9.0), Batch(2 * S + SETTLE_NS, 3 * S, 7.0, 7.0)]
    assert windows(batches, periods) == [Window(True, 7.0, 7.0, 1)]


def test_each_on_window_against_the_mean_of_its_off_neighbours() -> None:
    wins = [Window(False, 100.0, 90.0, 3), Window(True, 130.0, 100.0, 3),
            Window(False, 120.0, 90.0, 3), Window(True, 125.0, 95.0, 3),
            Window(False, 110.0, 95.0, 3), Window(True, 999.0, 999.0, 3)]
    assert paired_deltas(wins) == pytest.approx([20.0, 10.0])
    assert paired_deltas(wins, "cpu") == pytest.approx([10.0, 2.5])


def test_an_on_window_next_to_another_on_window_is_not_paired() -> None:
    wins = [Window(False, 100.0, 0.0, 1), Window(True, 130.0, 0.0, 1),
            Window(True, 120.0, 0.0, 1), Window(False, 110.0, 0.0, 1)]
    assert paired_deltas(wins) == []
