"""Where version 4's forward spends a work tile's time (64 query rows per consumer of one head: 128, or 192
with three consumers at d = 64) besides its key tiles:
the work tile's timeline (kernels/timeline.cuh), from a build of its own (-DBLOCK_TIMELINE) whose L holds
each work tile's marks. H200 only (sm_90a).

    python tools/block_timeline.py [--cases causal full window:1024] [--seq-len 4096] [--dim 128] [--csv F]

Per case, over every work tile: the cycles from its start (the consumers' turn to it) until Q_i has
landed; per key tile walked (the loop's cycles over its tiles: the first tile's products and softmax,
before the loop proper, included); from the last product into O to the end of the epilogue (O = O / l and
its stores, L); how much longer the last consumer takes than the first (each counts from its own
start); the rest, the work tile's cycles beyond its key tiles', in tiles' time; its wall time, the SM's
clock (cycles per ns) and the gap from its end to the start of the SM's next work tile (negative where
the next one starts first: a persistent block's consumer 0 starts the next while consumer 1 still
writes this one's O). --csv writes one row per case with those columns. The marks say how many consumers
the launch ran (version4.cuh chooses); the statistics are over the work tiles of whole rows (with 192-row
tiles, N = 4096 leaves a last one of 64 rows, left out).
"""
import argparse
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import bench  # noqa: E402
import minimal_flash as mf  # noqa: E402

B, H = 4, 16
Bc = 128  # version 4's forward key tile (kernels/flash3_hopper.cu); its query tile: 64 rows a consumer


def case(text):
    """An argparse type: causal, full (not causal), or window:W (causal, window_size=(W, 0))."""
    if text in ("causal", "full"):
        return text
    if text.startswith("window:") and text[7:].isdigit() and int(text[7:]) >= 1:
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is not causal, full or window:W (W >= 1)")


def options(name):
    """flash_attention's options for a case."""
    if name == "full":
        return dict(causal=False)
    if name == "causal":
        return dict(causal=True)
    return dict(causal=True, window_size=(int(name[7:]), 0))


def tiles_walked(name, N, Br=128):
    """The key tiles each whole query tile of Br rows walks (kernels/flash3_hopper.cu: causal stops at the
    diagonal, the tile's last row's; a window skips the tiles that hold no pair 0 <= row - key <= W)."""
    counts = []
    for r0 in range(0, N - Br + 1, Br):
        if name == "full":
            counts.append(N // Bc)
            continue
        ends = range(0, (r0 + Br - 1) // Bc + 1)  # causal: key tiles up to the diagonal's
        W = int(name[7:]) if name.startswith("window:") else None
        counts.append(sum(1 for j in ends if W is None or r0 - (j * Bc + Bc - 1) <= W))
    return torch.tensor(counts)


def summary(records, walked):
    """records: int64 (work tiles, consumers, 8), what each consumer's thread 0 wrote (timeline.cuh);
    walked: (work tiles,) the key tiles each walked. The case's medians and means, as the module's docstring
    says them."""
    first, second = records[:, 0], records[:, -1]  # (second: the last consumer)
    sm, start_ns = first[:, 0], first[:, 1]
    later = (second[:, 2] - first[:, 2]) % 2**32 < 2**31  # which consumer ended last (the timer wraps)
    end_ns = torch.where(later, second[:, 2], first[:, 2])
    end = torch.maximum(first[:, 5], second[:, 5])  # cycles, each consumer's from its own start of the work tile
    per_tile = statistics.median(((first[:, 4] - first[:, 3]) / walked.clamp(min=1)).tolist())
    wall = (end_ns - start_ns) % 2**32
    since = (start_ns - start_ns[0] + 2**31) % 2**32 - 2**31  # ns after block 0's start (a kernel lasts < 2 s)
    gaps = []
    for s in sm.unique():
        blocks = (sm == s).nonzero().flatten()
        order = blocks[torch.argsort(since[blocks])]
        gaps += [int((start_ns[b] - end_ns[a] + 2**31) % 2**32 - 2**31) for a, b in zip(order[:-1], order[1:])]
    return dict(work_tiles=len(records), tiles=walked.double().mean().item(),
                q_landed=first[:, 3].double().median().item(), per_tile=per_tile,
                epilogue=(first[:, 5] - first[:, 4]).double().median().item(),
                skew=(second[:, 5] - first[:, 5]).double().median().item(),
                rest_tiles=((end - walked * per_tile) / per_tile).double().mean().item(),
                work_tile_us=wall.double().mean().item() / 1e3,
                cycles_per_ns=(end.double().mean() / wall.double().mean()).item(),
                gap_ns=statistics.median(gaps) if gaps else float("nan"))


def records_of(L, N):
    """Each whole work tile's marks out of L (B, H, N) as timeline.cuh wrote them, and its rows Br (64 a
    consumer, their count in the marks): ((B * H * (N // Br), consumers, 8) int64, Br)."""
    bits = L.cpu().contiguous().view(torch.int32).reshape(-1, N)
    consumers = int(bits[0, 6])
    if consumers not in (2, 3):
        raise ValueError(f"L holds no block timeline (its first marks say {consumers} consumers)")
    Br = 64 * consumers
    tiles = bits[:, :N // Br * Br].reshape(-1, N // Br, consumers, 64)[..., :8]
    return tiles.reshape(-1, consumers, 8).long(), Br


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--cases", type=case, nargs="+", default=["causal", "full", "window:1024"])
    p.add_argument("--seq-len", type=bench.at_least(128), default=4096)
    p.add_argument("--dim", type=int, choices=mf.VERSIONS[4].head_dims, default=128)
    p.add_argument("--csv", type=Path, help="also write one row per case to this CSV")
    args = p.parse_args(argv)
    N = args.seq_len
    if N % 128:
        p.error(f"argument --seq-len: {N} is not a multiple of 128: each block's marks take whole tiles' rows")
    if not torch.cuda.is_available():
        sys.exit("block_timeline.py times version 4's CUDA kernels: it needs a Hopper GPU")
    refusal = mf.version_unavailable(4, "cuda")
    if refusal:
        sys.exit(f"block_timeline.py: {refusal}")
    # This process's version 4 is the timeline build, compiled in a folder of its own: never the one
    # every other call loads.
    mf.VERSIONS[4] = mf.VERSIONS[4].with_cuda_flags("-DBLOCK_TIMELINE")
    q, k, v = (torch.randn(B, H, N, args.dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, B={B} H={H} N={N} d={args.dim}; "
          "cycles as medians over the work tiles, the rest in tiles' time as a mean")
    rows = []
    for name in args.cases:
        for _ in range(3):  # warm: the build, the clocks
            mf.flash_attention(q, k, v, version=4, **options(name))
        _, L = mf.flash_attention(q, k, v, version=4, return_lse=True, **options(name))
        torch.cuda.synchronize()
        records, Br = records_of(L, N)
        row = dict(case=name, N=N, d=args.dim, consumers=records.shape[1],
                   **summary(records, tiles_walked(name, N, Br).repeat(B * H)))
        rows.append(row)
        print(f"{name:>12}: {row['work_tiles']} work tiles of {Br} rows, {row['tiles']:.2f} key tiles; Q landed at "
              f"{row['q_landed']:.0f} cycles, {row['per_tile']:.0f} a tile, epilogue {row['epilogue']:.0f}, last "
              f"consumer {row['skew']:+.0f}; rest {row['rest_tiles']:.2f} tiles; a work tile "
              f"{row['work_tile_us']:.2f} us at {row['cycles_per_ns']:.2f} cycles/ns, the SM's next "
              f"{row['gap_ns']:+.0f} ns after it", flush=True)
    if args.csv:
        bench.write_csv(rows, args.csv, fields=list(rows[0]))


if __name__ == "__main__":
    main()
