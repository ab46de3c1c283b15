"""FusionEmbedding forward: fixed-shape lookup (ours) vs the reference's masked_select /
masked_scatter formulation, on CPU, [8, 2048] tokens.

Prints the median time of each and the ratio reference / ours (> 1 means ours is faster).
Usage: python benchmarks/bench_fusion_embedding.py [--vocab 128256] [--dim 2048]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fusesurgery.modules import FusionEmbedding
from fusesurgery.testing import reference_fusion_embedding_forward


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=128_256)
    parser.add_argument("--fusion-vocab", type=int, default=8)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()

    torch.manual_seed(0)
    emb = FusionEmbedding(args.vocab, args.fusion_vocab, args.dim).requires_grad_(False)
    table_gb = (args.vocab + args.fusion_vocab) * args.dim * 4 / 1e9
    print(f"table {args.vocab}+{args.fusion_vocab} x {args.dim} fp32 ({table_gb:.2f} GB), "
          f"tokens [{args.batch}, {args.seq}], threads {torch.get_num_threads()}")
    print(f"{'new-token share':>16} {'reference ms':>13} {'ours ms':>9} {'ratio':>7}")
    for share in (1 / args.seq, 0.01, 0.1, 0.5):
        tokens = torch.randint(0, args.vocab, (args.batch, args.seq))
        is_new = torch.rand(args.batch, args.seq) < share
        tokens[is_new] = args.vocab + torch.randint(0, args.fusion_vocab, (int(is_new.sum()),))
        with torch.inference_mode():
            assert torch.equal(emb(tokens), reference_fusion_embedding_forward(emb, tokens))
            ref = median_seconds(
                lambda t=tokens: reference_fusion_embedding_forward(emb, t), args.repeats
            )
            ours = median_seconds(lambda t=tokens: emb(t), args.repeats)
        print(f"{share:>16.4f} {ref * 1e3:>13.2f} {ours * 1e3:>9.2f} {ref / ours:>7.2f}")


if __name__ == "__main__":
    main()
