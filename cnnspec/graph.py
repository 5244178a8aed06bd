"""The expanded network: named primitive layer nodes forming a DAG."""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

INPUT = "input"  # the name the network's input goes by


@dataclass(slots=True)  # one per layer: up to 100,000 in a check
class Node:
    name: str  # globally unique, dotted by block scope: "layer1.1.conv1"
    type: str  # canonical primitive type
    attrs: dict  # block arguments substituted
    inputs: list  # names of producers (INPUT for the network input)
    path: tuple  # document path of the layer's mapping
    attr_paths: dict = field(default_factory=dict)  # attribute -> document path of its value
    block: str = ""  # "inception 3a" when it came from a block instance


def topological(nodes: list[Node]) -> tuple[list[Node], list[Node]]:
    """Stable topological order (spec order where it already is one) and the nodes
    left on a cycle, if any."""
    index = {n.name: i for i, n in enumerate(nodes)}
    if all(index.get(i, -1) < k for k, n in enumerate(nodes) for i in n.inputs):
        return list(nodes), []  # already in order (the usual case): a linear check suffices
    waiting = {n.name: sum(1 for i in n.inputs if i in index) for n in nodes}
    consumers: dict[str, list[str]] = {}
    for n in nodes:
        for i in n.inputs:
            consumers.setdefault(i, []).append(n.name)
    order = []
    heap = sorted(index[n] for n, w in waiting.items() if w == 0)
    while heap:
        i = heapq.heappop(heap)
        node = nodes[i]
        order.append(node)
        for c in consumers.get(node.name, []):
            waiting[c] -= 1
            if waiting[c] == 0:
                heapq.heappush(heap, index[c])
    done = {n.name for n in order}
    return order, [n for n in nodes if n.name not in done]
