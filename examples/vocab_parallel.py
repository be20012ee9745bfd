"""Train a tiny language model whose output layer is sharded by vocabulary across ranks.

    torchrun --nproc-per-node 2 examples/vocab_parallel.py

Each rank holds a contiguous slice of the output layer's rows (unequal slices: the
vocabulary does not divide by the world size) and the replicated embedding. The loss is
losskit.distributed.vocab_parallel_linear_cross_entropy, with label smoothing and the
z-loss; the logits are never formed beyond one chunk. Every rank also trains the
single-process twin (the whole output layer, losskit.functional.linear_cross_entropy) from
the same start, and rank 0 prints both losses each step: they agree to float rounding.
Runs on CPU with the gloo backend in a few seconds.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist

import losskit.functional as LF
from losskit.distributed import vocab_parallel_linear_cross_entropy

VOCAB, HIDDEN, STEPS, LR = 1001, 32, 15, 0.5
OPTIONS = {"label_smoothing": 0.1, "lse_square_scale": 1e-4}


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same data and initial weights on every rank
    # Toy next-token data: each token is followed by one of two fixed successors.
    successors = torch.randint(0, VOCAB, (VOCAB, 2))
    starts = torch.randint(0, VOCAB, (32,))
    tokens = [starts]
    for _ in range(16):
        tokens.append(successors[tokens[-1], torch.randint(0, 2, (32,))])
    tokens = torch.stack(tokens, 1)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    embed = torch.nn.Embedding(VOCAB, HIDDEN)
    head = torch.randn(VOCAB, HIDDEN) * 0.05
    bounds = [VOCAB * r // world for r in range(world + 1)]
    start, end = bounds[rank], bounds[rank + 1]
    head_shard = torch.nn.Parameter(head[start:end].clone())
    sharded = torch.optim.SGD([*embed.parameters(), head_shard], lr=LR)

    embed_twin, head_twin = copy.deepcopy(embed), torch.nn.Parameter(head.clone())
    single = torch.optim.SGD([*embed_twin.parameters(), head_twin], lr=LR)

    if rank == 0:
        print(f"{world} ranks, vocabulary {VOCAB} split as {[b - a for a, b in zip(bounds, bounds[1:])]}")
        print(f"{'step':>4}  {'vocab-parallel':>14}  {'single process':>14}  {'difference':>10}")
    for step in range(STEPS):
        sharded.zero_grad()
        loss = vocab_parallel_linear_cross_entropy(embed(inputs), head_shard, targets, **OPTIONS)
        loss.backward()  # the embedding's gradient is summed over ranks: replicas stay equal
        sharded.step()

        single.zero_grad()
        twin = LF.linear_cross_entropy(embed_twin(inputs), head_twin, targets, **OPTIONS)
        twin.backward()
        single.step()
        if rank == 0:
            print(f"{step:>4}  {loss.item():>14.6f}  {twin.item():>14.6f}  {abs(loss.item() - twin.item()):>10.2e}")
    # Each shard is its slice of the single-process output layer.
    drift = (head_shard.detach() - head_twin.detach()[start:end]).abs().amax().reshape(1) if end > start else \
        torch.zeros(1)
    dist.all_reduce(drift, op=dist.ReduceOp.MAX)
    if rank == 0:
        print(f"largest difference between the shards and the single-process output layer: {drift.item():.2e}")
    dist.barrier()  # every rank done before the group is torn down
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
