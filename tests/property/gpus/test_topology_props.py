"""preferred() against brute force over random topologies."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from aiodp.gpus import topology


@st.composite
def problems(draw: st.DrawFn, max_gpus: int) -> tuple[topology.Topology, list[str], list[str], int]:
    n = draw(st.integers(2, max_gpus))
    numa = draw(st.lists(st.one_of(st.none(), st.integers(0, 1)), min_size=n, max_size=n))
    pairs = [(a, b) for a in range(n) for b in range(a + 1, n)]
    if draw(st.booleans()):  # NVSwitch-like: every pair alike, many twins
        links = dict.fromkeys(pairs, draw(st.integers(1, 18)))
    else:
        links = draw(
            st.dictionaries(st.sampled_from(pairs), st.integers(1, 12), max_size=len(pairs))
        )
    gpus = [f"GPU-{i:02d}" for i in range(n)]
    topo = topology.build(
        [(g, i, numa[i]) for i, g in enumerate(gpus)],
        nvlinks={frozenset((gpus[a], gpus[b])): c for (a, b), c in links.items()},
    )
    available = draw(st.lists(st.sampled_from(gpus), min_size=1, unique=True))
    size = draw(st.integers(1, len(available)))
    must = draw(st.lists(st.sampled_from(available), max_size=size, unique=True))
    return topo, available, must, size


def brute_best(topo: topology.Topology, available: list[str], must: list[str], size: int) -> int:
    rest = [g for g in available if g not in must]
    return max(
        topo.set_score([*must, *combo]) for combo in itertools.combinations(rest, size - len(must))
    )


@settings(max_examples=300, deadline=None)
@given(problems(max_gpus=10))
def test_topology_props_optimal_on_small_nodes(
    problem: tuple[topology.Topology, list[str], list[str], int],
) -> None:
    topo, available, must, size = problem
    answer = topology.preferred(available, must, size, topo)
    assert len(answer) == size
    assert len(set(answer)) == size
    assert set(answer) <= set(available)
    assert set(must) <= set(answer)
    assert topo.set_score(answer) == brute_best(topo, available, must, size)
    # deterministic, whatever order the kubelet sends
    assert topology.preferred(list(reversed(available)), must[::-1], size, topo) == answer


@settings(max_examples=60, deadline=None)
@given(problems(max_gpus=16))
def test_topology_props_shape_on_large_nodes(
    problem: tuple[topology.Topology, list[str], list[str], int],
) -> None:
    topo, available, must, size = problem
    answer = topology.preferred(available, must, size, topo)
    assert len(set(answer)) == size
    assert set(must) <= set(answer) <= set(available)
    assert topology.preferred(sorted(available), must, size, topo) == answer


@settings(max_examples=300, deadline=None)
@given(problems(max_gpus=9))
def test_topology_props_ties_follow_the_documented_order(
    problem: tuple[topology.Topology, list[str], list[str], int],
) -> None:
    """The exact answer among equal scores: least connectivity to the rest, then indexes."""
    topo, available, must, size = problem
    rest = [g for g in available if g not in must]

    def key(combo: tuple[str, ...]) -> tuple[int, int, tuple[int, ...]]:
        chosen = [*must, *combo]
        w = sum(topo.score(c, x) for c in chosen for x in available if x != c)
        return (-topo.set_score(chosen), w, tuple(sorted(topo.order[g] for g in chosen)))

    best = min(itertools.combinations(rest, size - len(must)), key=key)
    answer = topology.preferred(available, must, size, topo)
    assert key(tuple(g for g in answer if g not in must)) == key(best)
