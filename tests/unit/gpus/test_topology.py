from __future__ import annotations

import pytest

from aiodp.gpus import topology
from aiodp.kit.errors import InvalidRequest


def node(numa: list[int | None], links: dict[tuple[int, int], int]) -> topology.Topology:
    return topology.build(
        [(f"G{i}", i, n) for i, n in enumerate(numa)],
        nvlinks={frozenset((f"G{a}", f"G{b}")): c for (a, b), c in links.items()},
    )


EIGHT = node([0, 0, 0, 0, 1, 1, 1, 1], {(0, 1): 4, (2, 3): 4, (4, 5): 4, (6, 7): 4, (1, 2): 1})
ALL = [f"G{i}" for i in range(8)]


def test_topology_pair_scores() -> None:
    assert EIGHT.score("G0", "G1") == 420  # 4 NVLinks + same NUMA node
    assert EIGHT.score("G0", "G2") == 20
    assert EIGHT.score("G0", "G4") == 10
    assert topology.build([("a", 0, None), ("b", 1, None)]).score("a", "b") == 10
    pcie = topology.build([("a", 0, 0), ("b", 1, 0)], pcie={frozenset(("a", "b")): "single-switch"})
    assert pcie.score("a", "b") == 50


@pytest.mark.parametrize(
    ("available", "must", "size", "expected"),
    [
        (ALL, [], 2, ["G4", "G5"]),  # a 4-link pair; G0-G1 would cut the G1-G2 link
        (ALL, ["G5"], 2, ["G4", "G5"]),  # its NVLink partner
        (ALL, ["G1"], 3, ["G0", "G1", "G2"]),  # both of G1's links
        (ALL, [], 4, ["G0", "G1", "G2", "G3"]),
        (["G0", "G4", "G6"], [], 2, ["G4", "G6"]),  # same NUMA node beats across
        (ALL, [], 1, ["G0"]),
        (ALL, ["G3", "G7"], 2, ["G3", "G7"]),
        (ALL, [], 8, ALL),
    ],
)
def test_topology_preferred_table(
    available: list[str], must: list[str], size: int, expected: list[str]
) -> None:
    assert topology.preferred(available, must, size, EIGHT) == expected
    assert topology.preferred(list(reversed(available)), must, size, EIGHT) == expected


def test_topology_ties_leave_the_best_connected_gpus() -> None:
    # G0-G1 and G2-G3 are equal pairs, but G2 is also linked to G4: take G0-G1
    topo = node([0, 0, 0, 0, 0], {(0, 1): 2, (2, 3): 2, (2, 4): 2})
    assert topology.preferred([f"G{i}" for i in range(5)], [], 2, topo) == ["G0", "G1"]
    topo = node([0, 0, 0, 0, 0], {(0, 1): 2, (2, 3): 2, (0, 4): 2})
    assert topology.preferred([f"G{i}" for i in range(5)], [], 2, topo) == ["G2", "G3"]


@pytest.mark.parametrize(
    ("available", "must", "size", "message"),
    [
        (ALL, [], 0, "allocation_size must be positive"),
        (["G0"], [], 2, "exceeds the 1 available"),
        (["G0"], ["G1"], 1, "must_include device id(s) not in available: G1"),
        (["G0", "G1"], ["G0", "G1"], 1, "more than allocation_size"),
    ],
)
def test_topology_preferred_rejects(
    available: list[str], must: list[str], size: int, message: str
) -> None:
    with pytest.raises(InvalidRequest, match=message.replace("(", r"\(").replace(")", r"\)")):
        topology.preferred(available, must, size, EIGHT)
