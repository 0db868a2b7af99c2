"""The random-walks task of RLHF (after trlx's example), with an exact gold reward.

A random directed graph of 21 nodes, the letters ``a``..``u``; ``a`` is the goal. A walk
is a string of letters that follows edges from its start to the goal, at most
``max_length`` letters. The prompt is the start letter, the response the rest of the
walk. Pre-training sees random walks (a uniformly random out-edge at every step, cut
at ``max_length`` letters whether or not they reached the goal); fine-tuning sees the
ones that reached it; an RL-trained policy should learn the shortest paths.

Gold reward (trlx's ``optimality``): a response that follows edges to the goal in
``n`` steps, and stops there, scores ``(max_length − n) / (max_length − n*)`` where
``n*`` is the shortest path from its start: 1 for a shortest path, less for longer
ones. A response with a letter that is not a node, a step along no edge, letters after
the goal, or no goal within ``max_length`` letters is invalid and scores 0.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import pathlib
from collections.abc import Sequence

import numpy as np

GOAL = 0
LETTERS = "abcdefghijklmnopqrstu"


@dataclasses.dataclass(frozen=True)
class Graph:
    adjacency: np.ndarray  # [n, n] bool: adjacency[i, j] = an edge i → j
    max_length: int  # letters in a walk, start included

    @property
    def num_nodes(self) -> int:
        return len(self.adjacency)

    def shortest(self) -> np.ndarray:
        """[n] edges of the shortest path from each node to the goal (BFS backwards)."""
        n = self.num_nodes
        distance = np.full(n, np.iinfo(np.int32).max, np.int64)
        distance[GOAL] = 0
        queue = collections.deque([GOAL])
        while queue:
            node = queue.popleft()
            for previous in np.nonzero(self.adjacency[:, node])[0]:
                if distance[previous] > distance[node] + 1:
                    distance[previous] = distance[node] + 1
                    queue.append(previous)
        return distance


def make_graph(num_nodes: int = 21, edge_probability: float = 0.1, max_length: int = 10,
               seed: int = 1002) -> Graph:  # fmt: skip
    """trlx's graph: edges with probability p (redrawn until every node has an out-edge
    and every node reaches the goal within ``max_length − 1`` steps), no self-loops,
    the goal absorbing."""
    rng = np.random.default_rng(seed)
    while True:
        adjacency = rng.random((num_nodes, num_nodes)) < edge_probability
        np.fill_diagonal(adjacency, False)
        adjacency[GOAL] = False
        graph = Graph(adjacency, max_length)
        if adjacency[1:].any(axis=1).all() and (graph.shortest() < max_length).all():
            return graph


GRAPH = make_graph()


def random_walks(graph: Graph, count: int, seed: int) -> list[str]:
    """``count`` walks from uniformly random non-goal starts, a uniformly random out-edge
    at each step, ending at the goal or after ``max_length`` letters."""
    rng = np.random.default_rng(seed)
    walks = []
    for _ in range(count):
        node = int(rng.integers(1, graph.num_nodes))
        walk = [node]
        while node != GOAL and len(walk) < graph.max_length:
            node = int(rng.choice(np.nonzero(graph.adjacency[node])[0]))
            walk.append(node)
        walks.append("".join(LETTERS[i] for i in walk))
    return walks


def walk_length(graph: Graph, walk: str) -> int | None:
    """Edges from the start to the goal, or None when the walk is invalid."""
    if not walk or len(walk) > graph.max_length or any(c not in LETTERS[: graph.num_nodes]
                                                         for c in walk):  # fmt: skip
        return None
    nodes = [LETTERS.index(c) for c in walk]
    if GOAL in nodes[:-1] or nodes[-1] != GOAL:
        return None  # letters after the goal, or the goal never reached
    if not all(graph.adjacency[a, b] for a, b in itertools.pairwise(nodes)):
        return None
    return len(nodes) - 1


def gold_reward(prompts: Sequence[str], responses: Sequence[str], graph: Graph = GRAPH):
    """Optimality of each walk ``prompt + response`` in [0, 1]; 0 for an invalid walk."""
    shortest = graph.shortest()
    rewards = []
    for prompt, response in zip(prompts, responses, strict=True):
        length = walk_length(graph, prompt + response)
        if length is None or length == 0:
            rewards.append(0.0)
            continue
        best = shortest[LETTERS.index(prompt[0])]
        rewards.append((graph.max_length - length) / (graph.max_length - best))
    return rewards


def invalid(prompts: Sequence[str], responses: Sequence[str], graph: Graph = GRAPH):
    """Whether each walk is invalid (see ``walk_length``)."""
    return [walk_length(graph, p + r) is None for p, r in zip(prompts, responses, strict=True)]


# ----------------------------------------------------------------------------- the stages' data


def write_task(directory: str | pathlib.Path, *, walks: int = 20_000, pairs: int = 4_000,
               seed: int = 0, graph: Graph = GRAPH) -> dict[str, pathlib.Path]:  # fmt: skip
    """Writes each stage's data into ``directory`` (once; kept when already there):

    corpus/walks_<k>.txt   random walks, one per line, in 8 files (pre-training corpus)
    sft.jsonl              {"prompt": start, "response": rest} of the walks that reached
                           the goal
    preferences.jsonl      pairs of walks from one start with different gold rewards,
                           some with mistakes: {"prompt", "chosen", "rejected"}
    prompts.txt            the 20 start letters, one per line (the RL prompts)
    """
    directory = pathlib.Path(directory)
    paths = {
        "corpus": directory / "corpus",
        "sft": directory / "sft.jsonl",
        "preferences": directory / "preferences.jsonl",
        "prompts": directory / "prompts.txt",
    }
    if all(p.exists() for p in paths.values()):
        return paths
    paths["corpus"].mkdir(parents=True, exist_ok=True)
    corpus = random_walks(graph, walks, seed)
    for k in range(8):
        text = "\n".join(corpus[k::8]) + "\n"
        (paths["corpus"] / f"walks_{k}.txt").write_text(text, encoding="utf-8")
    reached = [w for w in corpus if walk_length(graph, w) is not None]
    lines = [json.dumps({"prompt": w[0], "response": w[1:]}) for w in reached]
    paths["sft"].write_text("\n".join(lines) + "\n", encoding="utf-8")
    paths["preferences"].write_text(
        "".join(json.dumps(p) + "\n" for p in preference_pairs(graph, pairs, seed + 1)),
        encoding="utf-8",
    )
    paths["prompts"].write_text("\n".join(LETTERS[1 : graph.num_nodes]) + "\n")
    return paths


def corrupt(walk: str, rng: np.random.Generator, graph: Graph) -> str:
    """The mistakes a policy makes, for the reward model to see: a letter replaced (most
    often a step along no edge), letters after the goal, or the walk cut short."""
    letters = LETTERS[: graph.num_nodes]
    kind = rng.integers(3)
    if kind == 0 and len(walk) > 1:
        i = int(rng.integers(1, len(walk)))
        return walk[:i] + letters[rng.integers(len(letters))] + walk[i + 1 :]
    if kind == 1 and len(walk) < graph.max_length:
        extra = rng.integers(1, graph.max_length - len(walk) + 1)
        return walk + "".join(letters[j] for j in rng.integers(len(letters), size=extra))
    return walk[: max(2, len(walk) - 1 - int(rng.integers(len(walk) - 1)))]


def preference_pairs(graph: Graph, count: int, seed: int, corrupted: float = 0.3):
    """``count`` pairs of distinct walks from one start, the one of higher gold reward
    chosen (pairs of equal reward are skipped). Walks are random walks, a ``corrupted``
    share of them with a mistake (``corrupt``)."""
    rng = np.random.default_rng(seed)
    pool = [corrupt(w, rng, graph) if rng.random() < corrupted else w
            for w in random_walks(graph, 8 * count, seed)]  # fmt: skip
    by_start = collections.defaultdict(list)
    for walk in pool:
        by_start[walk[0]].append(walk)
    starts = sorted(by_start)
    pairs = []
    while len(pairs) < count:
        options = by_start[starts[rng.integers(len(starts))]]
        a, b = (options[i] for i in rng.choice(len(options), 2, replace=False))
        [ra, rb] = gold_reward([a[0], b[0]], [a[1:], b[1:]], graph)
        if ra == rb:
            continue
        chosen, rejected = (a, b) if ra > rb else (b, a)
        pairs.append({"prompt": a[0], "chosen": chosen[1:], "rejected": rejected[1:]})
    return pairs
