"""The routing rules and the receive order, as plain functions."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dagster_taskiq.core.errors import RoutingError
from dagster_taskiq.core.routing import (
    DAGSTER_PRIORITY_TAG,
    PRIORITY_TAG,
    QUEUE_TAG,
    RUN_PRIORITY_TAG,
    QueueRoute,
    Routing,
    poll_order,
)

DEFAULT = QueueRoute("default", "https://sqs/default", priority_url="https://sqs/default-lane")
HIGHMEM = QueueRoute("highmem", "https://sqs/highmem")
ROUTING = Routing({"default": DEFAULT, "highmem": HIGHMEM})


def test_no_tag_goes_to_the_default_queue() -> None:
    destination = ROUTING.destination("s", {}, {})
    assert destination.route is DEFAULT and destination.url == DEFAULT.url
    assert destination.priority == 0 and not destination.in_priority_lane


def test_the_op_tag_wins_over_the_run_tag() -> None:
    assert ROUTING.destination("s", {QUEUE_TAG: "highmem"}, {QUEUE_TAG: "default"}).route is HIGHMEM
    assert ROUTING.destination("s", {}, {QUEUE_TAG: "highmem"}).route is HIGHMEM


def test_an_unknown_queue_names_the_known_ones() -> None:
    with pytest.raises(RoutingError, match="Known queues: default, highmem"):
        ROUTING.destination("s", {QUEUE_TAG: "gpu"}, {})


def test_step_and_run_priorities_add_up_and_reach_the_lane() -> None:
    below = ROUTING.destination("s", {PRIORITY_TAG: "-2"}, {RUN_PRIORITY_TAG: "2"})
    assert below.priority == 0 and below.url == DEFAULT.url
    above = ROUTING.destination("s", {PRIORITY_TAG: "1"}, {RUN_PRIORITY_TAG: "2"})
    assert above.priority == 3 and above.url == DEFAULT.priority_url and above.in_priority_lane


def test_dagster_priority_tags_count_where_ours_are_absent() -> None:
    assert ROUTING.destination("s", {DAGSTER_PRIORITY_TAG: "4"}, {}).priority == 4
    assert ROUTING.destination("s", {}, {DAGSTER_PRIORITY_TAG: "2"}).priority == 2
    ours = ROUTING.destination("s", {PRIORITY_TAG: "1", DAGSTER_PRIORITY_TAG: "9"}, {})
    assert ours.priority == 1


def test_a_queue_without_a_lane_takes_every_priority() -> None:
    destination = ROUTING.destination("s", {QUEUE_TAG: "highmem", PRIORITY_TAG: "10"}, {})
    assert destination.url == HIGHMEM.url and not destination.in_priority_lane


def test_a_priority_that_is_not_a_number_is_a_clear_error() -> None:
    with pytest.raises(RoutingError, match="'high', which is not a whole number"):
        ROUTING.destination("s", {PRIORITY_TAG: "high"}, {})


def test_threshold_is_configurable() -> None:
    strict = Routing({"default": DEFAULT}, priority_threshold=5)
    assert strict.destination("s", {PRIORITY_TAG: "4"}, {}).url == DEFAULT.url
    assert strict.destination("s", {PRIORITY_TAG: "5"}, {}).url == DEFAULT.priority_url


def test_fifo_message_group_per_run_or_per_step() -> None:
    assert Routing({"default": DEFAULT}).message_group("r1", "a") == "r1"
    assert Routing({"default": DEFAULT}, fifo_group="step").message_group("r1", "a") == "r1:a"


def test_routing_needs_a_default_queue() -> None:
    with pytest.raises(ValueError, match="default"):
        Routing({"highmem": HIGHMEM})


def test_lanes_lead_except_every_ratio_plus_one_th_round() -> None:
    orders = [poll_order(["lane"], ["normal"], n, ratio=3)[0] for n in range(8)]
    assert orders == ["lane", "lane", "lane", "normal"] * 2


@given(
    lanes=st.lists(st.sampled_from("abc"), min_size=1, max_size=3, unique=True),
    normal=st.lists(st.sampled_from("xyz"), min_size=1, max_size=3, unique=True),
    ratio=st.integers(1, 10),
    start=st.integers(0, 1000),
)
def test_no_queue_waits_for_ever_to_lead(
    lanes: list[str], normal: list[str], ratio: int, start: int
) -> None:
    """Every queue leads some round within a bounded window, and each round polls all."""
    window = (ratio + 1) * len(lanes) * len(normal)
    leaders = set()
    for n in range(start, start + window):
        order = poll_order(lanes, normal, n, ratio)
        assert sorted(order) == sorted(lanes + normal)
        leaders.add(order[0])
    assert set(normal) <= leaders and set(lanes) <= leaders
