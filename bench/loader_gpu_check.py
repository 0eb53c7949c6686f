"""The torch DataLoader path on a GPU: DeviceLoader, which copies batch k+1 on a side stream while
step k runs, hands out exactly the batches the DataLoader made, in order, channels-last with int64
labels, also when the consumer's stream is busy with a step's work while the next copy is in flight.

    python bench/loader_gpu_check.py [--batches 12] [--batch-size 64] [--size 224]

Exit status 0 when every batch matches, 1 on a mismatch, 2 without a GPU.
"""

from __future__ import annotations

import argparse
import sys

import torch


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--size", type=int, default=224, help="image side, px")
    a = p.parse_args()
    if not torch.cuda.is_available():
        print("loader_gpu_check: needs a CUDA GPU", file=sys.stderr)
        return 2
    from torch.utils.data import DataLoader, TensorDataset

    from imnet.data import DeviceLoader

    g = torch.Generator().manual_seed(0)
    n = a.batches * a.batch_size
    ds = TensorDataset(torch.randn(n, 3, a.size, a.size, generator=g), torch.randint(0, 1000, (n,), generator=g))
    loader = DataLoader(ds, batch_size=a.batch_size, pin_memory=True)
    want = list(DataLoader(ds, batch_size=a.batch_size))
    dev = torch.device("cuda")
    work = torch.randn(4096, 4096, device=dev)
    got = []
    for x, y in DeviceLoader(loader, dev, channels_last=True):
        for _ in range(8):  # a step's worth of work on the consumer's stream while the next copy runs
            work = torch.tanh(work @ work / 4096)
        got.append((x.clone(), y.clone(), x.is_contiguous(memory_format=torch.channels_last), y.dtype))
    torch.cuda.synchronize()
    bad = [i for i, ((x, y, cl, dt), (wx, wy)) in enumerate(zip(got, want))
           if not (cl and dt == torch.int64 and torch.equal(x.cpu(), wx) and torch.equal(y.cpu(), wy))]
    print(f"loader_gpu_check: {len(got)} of {len(want)} batches handed out on {torch.cuda.get_device_name()}, "
          f"{len(bad)} differ from the DataLoader's" + (f" (batches {bad})" if bad else ""))
    return 1 if bad or len(got) != len(want) else 0


if __name__ == "__main__":
    sys.exit(main())
