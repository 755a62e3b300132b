"""Randomized local search for MAX-CUT on the graphs of maxcut.batch.

Every run starts from a random partition and flips one vertex at a time, keeping the
flip when the cut does not shrink; it checkpoints every 2000 steps, so a paused run
resumes where it was instead of starting over. ``steps`` (default 40,000) is a
parameter a grid can vary (notebooks/variants.ipynb compares two values).
"""

import random

STEPS = 40000
CHECKPOINT_EVERY = 2000


def read_graph(path):
    edges = []
    with open(path) as f:
        for line in f:
            if line.strip() and not line.startswith("#"):
                a, b = line.split()
                edges.append((int(a), int(b)))
    n = 1 + max(max(e) for e in edges)
    neighbours = [[] for _ in range(n)]
    for a, b in edges:
        neighbours[a].append(b)
        neighbours[b].append(a)
    return neighbours, len(edges)


def run(instance, save_callback, state, iteration, steps=STEPS):
    neighbours, m = read_graph(instance)
    n = len(neighbours)
    if state is None:  # a first attempt: random start, seeded per iteration
        rng = random.Random(iteration)
        side = [rng.random() < 0.5 for _ in range(n)]
        step = 0
    else:  # resuming from a checkpoint
        side, step = state["side"], state["step"]
        rng = random.Random(iteration * 1_000_003 + step)
    cut = sum(side[a] != side[b] for a in range(n) for b in neighbours[a]) // 2
    while step < steps:
        v = rng.randrange(n)
        gain = sum(1 if side[v] == side[u] else -1 for u in neighbours[v])
        if gain >= 0:
            side[v] = not side[v]
            cut += gain
        step += 1
        if step % CHECKPOINT_EVERY == 0 and step < steps:
            save_callback({"side": side, "step": step})
    return {"cut": cut, "edges": m, "ratio": cut / m}
