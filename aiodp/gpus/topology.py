"""Which GPUs to give a container: the best-connected set, found exactly and quickly.

A set's score is the sum of NVIDIA's pair scores over its pairs (go-gpuallocator's
BestEffortPolicy): NVLink 100 per link, plus the PCIe relation of the pair (same board 60,
single switch 50, multiple switches 40, host bridge 30, same NUMA node 20, across 10).
`preferred` returns a set of the requested size, inside `available`, containing
`must_include`, with the highest possible score; among equal scores the one that leaves
the best-connected GPUs to the next request (the smallest cut to the rest), then the
lowest indexes. Branch and bound over the cached topology: no hardware on this path.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from aiodp.kit.errors import InvalidRequest

NVLINK_SCORE: Final = 100
MAX_ANSWERS: Final = 256
"""Answers `preferred` keeps per topology (a few KiB)."""
PCIE_SCORES: Final[Mapping[str, int]] = {
    "board": 60,
    "single-switch": 50,
    "multiple-switches": 40,
    "host-bridge": 30,
    "numa": 20,
    "system": 10,
}


@dataclass(frozen=True, slots=True)
class Topology:
    """Pair scores between GPUs (by UUID), computed once at discovery and then reused."""

    order: Mapping[str, int] = field(default_factory=dict)
    """GPU UUID -> index, the final tie-break."""
    scores: Mapping[frozenset[str], int] = field(default_factory=dict)
    nvlinks: Mapping[frozenset[str], int] = field(default_factory=dict)
    """NVLink count of each linked GPU pair (what DRA's NVLink islands are made of)."""
    _pairs: dict[str, dict[str, int]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    """`scores` as a nested dict: a lookup without building a frozenset per pair (the
    search asks ~100 times per call)."""
    _answers: dict[tuple[frozenset[str], tuple[str, ...], int], list[str]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    """`preferred`'s answers by question, at most MAX_ANSWERS: the kubelet asks the same
    questions again and again, and the topology never changes under them."""

    def __post_init__(self) -> None:
        for pair, value in self.scores.items():
            a, b = tuple(pair)
            self._pairs.setdefault(a, {})[b] = value
            self._pairs.setdefault(b, {})[a] = value

    def score(self, a: str, b: str) -> int:
        return self._pairs.get(a, {}).get(b, 0)

    def set_score(self, ids: Collection[str]) -> int:
        items = sorted(ids)
        return sum(self.score(a, b) for i, a in enumerate(items) for b in items[i + 1 :])


def build(
    gpus: Sequence[tuple[str, int, int | None]],
    *,
    nvlinks: Mapping[frozenset[str], int] | None = None,
    pcie: Mapping[frozenset[str], str] | None = None,
) -> Topology:
    """Topology from (uuid, index, numa node) triples, NVLink counts and PCIe relations.

    A pair without a known PCIe relation scores by NUMA node: 20 on the same node, else 10.
    """
    nvlinks = nvlinks or {}
    pcie = pcie or {}
    scores: dict[frozenset[str], int] = {}
    for i, (a, _, numa_a) in enumerate(gpus):
        for b, _, numa_b in gpus[i + 1 :]:
            pair = frozenset((a, b))
            relation = pcie.get(pair)
            if relation is None:
                same = numa_a is not None and numa_a == numa_b
                relation = "numa" if same else "system"
            scores[pair] = NVLINK_SCORE * nvlinks.get(pair, 0) + PCIE_SCORES[relation]
    linked = {pair: n for pair, n in nvlinks.items() if n > 0}
    return Topology(order={u: idx for u, idx, _ in gpus}, scores=scores, nvlinks=linked)


def _check(avail: set[str], must: set[str], size: int) -> None:
    if size <= 0:
        raise InvalidRequest(f"allocation_size must be positive, got {size}")
    if not must <= avail:
        missing = ", ".join(sorted(must - avail))
        raise InvalidRequest(f"must_include device id(s) not in available: {missing}")
    if size > len(avail):
        raise InvalidRequest(f"allocation_size {size} exceeds the {len(avail)} available device(s)")
    if len(must) > size:
        raise InvalidRequest(
            f"must_include has {len(must)} device(s), more than allocation_size {size}"
        )


def preferred(
    available: Collection[str], must_include: Collection[str], size: int, topo: Topology
) -> list[str]:
    """The best `size` GPUs out of `available` that include `must_include` (see module doc)."""
    avail = set(available)
    must = set(must_include)
    _check(avail, must, size)
    question = (frozenset(avail), tuple(sorted(must)), size)
    known = topo._answers.get(question)
    if known is not None:
        return list(known)

    def key(u: str) -> tuple[int, str]:
        return (topo.order.get(u, 1 << 30), u)

    cands = sorted(avail - must, key=key)
    fixed = sorted(must, key=key)
    need = size - len(fixed)
    if need == 0:
        answer = fixed
    elif need == len(cands):
        answer = sorted(fixed + cands, key=key)
    else:
        answer = sorted(fixed + _search(cands, fixed, need, sorted(avail, key=key), topo), key=key)
    if len(topo._answers) >= MAX_ANSWERS:
        topo._answers.pop(next(iter(topo._answers)))  # the oldest question goes
    topo._answers[question] = answer
    return list(answer)


def preferred_grouped(
    available: Collection[str],
    must_include: Collection[str],
    size: int,
    group: Mapping[str, str],
    totals: Mapping[str, int],
    order: Mapping[str, int],
    policy: str,
) -> list[str]:
    """Replicas and MIG devices: NVIDIA's greedy policy, made deterministic.

    `group` maps each ID to what it shares (the GPU of a replica, the parent GPU of a MIG
    device); `totals` counts a group's devices in the resource. Each pick takes, by
    `distributed`, the group with the fewest devices in use (allocated elsewhere or picked
    now), or by `packed`, the most; then the group picked least in this call; then the
    lowest index and ID.
    """
    avail = set(available)
    must = set(must_include)
    _check(avail, must, size)
    in_use = {g: totals.get(g, 0) for g in set(group.values())}
    for d in avail:
        in_use[group[d]] -= 1
    picked: dict[str, int] = {}
    for d in must:
        in_use[group[d]] += 1
        picked[group[d]] = picked.get(group[d], 0) + 1
    sign = 1 if policy == "distributed" else -1
    chosen = sorted(must, key=lambda d: (order.get(d, 1 << 30), d))
    cands = avail - must
    for _ in range(size - len(must)):
        best = min(
            cands,
            key=lambda d: (
                sign * in_use[group[d]],
                picked.get(group[d], 0),
                order.get(d, 1 << 30),
                d,
            ),
        )
        cands.discard(best)
        chosen.append(best)
        in_use[group[best]] += 1
        picked[group[best]] = picked.get(group[best], 0) + 1
    return chosen


def _search(
    cands: list[str], fixed: list[str], need: int, avail: list[str], topo: Topology
) -> list[str]:
    """Branch and bound for the best `need` of `cands` added to `fixed`.

    Objective, lexicographic: set score (max), then connectivity W (min), then index tuple
    (min). W = sum over chosen GPUs of their score to every available GPU; with the set
    score fixed, minimising W minimises the cut between the set and the GPUs left over.
    Candidates are visited in index order, so the first set reaching a key wins its ties.
    Interchangeable candidates (twins: the same scores to everything else) are only taken
    in index order, which cuts the symmetric search spaces of NVSwitch-like nodes.
    """
    n = len(cands)
    s = [[topo.score(a, b) if a != b else 0 for b in cands] for a in cands]
    w = [sum(topo.score(c, x) for x in avail if x != c) for c in cands]
    base = [sum(topo.score(c, f) for f in fixed) for c in cands]
    fixed_score = topo.set_score(fixed)
    big = sum(w) + 1  # the weight of one score point over all of W
    # top[c][r]: the sum of c's r best pair scores to other candidates (a loose, cheap bound)
    top = []
    for c in range(n):
        row = sorted((s[c][d] for d in range(n) if d != c), reverse=True)
        acc = [0]
        for v in row:
            acc.append(acc[-1] + v)
        top.append(acc)

    twin = _twin_classes(s, w, base)
    best_key = -1 << 62
    best: list[int] = []
    chosen: list[int] = []
    gain = list(base)  # gain[c]: score c adds to fixed + chosen

    def bound(start: int, left: int, score: int, weight: int) -> int:
        pool = range(start, n)
        if n - start < left:
            return -1 << 62
        opt = sorted((gain[c] * 2 + top[c][left - 1] for c in pool), reverse=True)
        light = sorted(w[c] for c in pool)
        ub_score = score + sum(opt[:left]) // 2
        return ub_score * big - (weight + sum(light[:left]))

    def dfs(start: int, left: int, score: int, weight: int, skipped: int) -> None:
        nonlocal best_key, best
        if left == 0:
            k = score * big - weight
            if k > best_key:
                best_key, best = k, list(chosen)
            return
        if bound(start, left, score, weight) <= best_key:
            return
        for c in range(start, n - left + 1):
            if skipped >> twin[c] & 1:
                continue  # a lower-index twin was left out: this set has a better twin
            chosen.append(c)
            g = gain[c]
            for d in range(n):
                gain[d] += s[c][d]
            dfs(c + 1, left - 1, score + g, weight + w[c], skipped)
            for d in range(n):
                gain[d] -= s[c][d]
            chosen.pop()
            skipped |= 1 << twin[c]
            if bound(c + 1, left, score, weight) <= best_key:
                return

    dfs(0, need, fixed_score, 0, 0)
    return [cands[c] for c in best]


def _twin_classes(s: list[list[int]], w: list[int], base: list[int]) -> list[int]:
    """A class number per candidate; twins share one: they score the same to every other
    GPU (fixed, candidate or merely available), so either can stand for the other."""
    n = len(s)
    reps: list[int] = []
    out = []
    for c in range(n):
        for k, r in enumerate(reps):
            if (
                w[c] == w[r]
                and base[c] == base[r]
                and all(s[c][x] == s[r][x] for x in range(n) if x != c and x != r)
            ):
                out.append(k)
                break
        else:
            out.append(len(reps))
            reps.append(c)
    return out
