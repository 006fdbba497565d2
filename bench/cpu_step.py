"""Time one training step on the CPU: memory format x threads x model, for the fp32 CPU path.

    python bench/cpu_step.py                       # small_cnn on MNIST-sized (28x28) and digits-sized (16x16) input
    python bench/cpu_step.py --models small_cnn,resnet9 --batch 64

Prints milliseconds per training step and per sample; the ratio contiguous / channels_last is the speed-up
the Simulation gets from running channels_last on the CPU. Then the evaluation (forward only, channels_last)
per image by batch size, which sets `eval.batch_size`'s CPU default.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from permanence.models import build_model


def ms_per_step(model_name: str, size: int, batch: int, threads: int, channels_last: bool, steps: int) -> float:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = build_model(model_name, 1, 10).to(memory_format=fmt)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(batch, 1, size, size).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,))

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(5):
        step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - started) / steps * 1e3


@torch.no_grad()
def eval_us_per_image(model_name: str, size: int, batch: int, threads: int, images: int = 1024) -> float:
    torch.set_num_threads(threads)
    model = build_model(model_name, 1, 10).to(memory_format=torch.channels_last).eval()
    x = torch.randn(images, 1, size, size).contiguous(memory_format=torch.channels_last)

    def run() -> None:
        for start in range(0, images, batch):
            model(x[start : start + batch])

    run()
    started = time.perf_counter()
    for _ in range(3):
        run()
    return (time.perf_counter() - started) / 3 / images * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="small_cnn")
    parser.add_argument("--sizes", default="28,16")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    print(f"{'model':10} {'size':>4} {'threads':>7} {'contiguous ms':>13} {'channels_last ms':>16} {'speed-up':>8}")
    for name in args.models.split(","):
        for size in map(int, args.sizes.split(",")):
            for threads in map(int, args.threads.split(",")):
                plain = ms_per_step(name, size, args.batch, threads, False, args.steps)
                last = ms_per_step(name, size, args.batch, threads, True, args.steps)
                print(f"{name:10} {size:4} {threads:7} {plain:13.1f} {last:16.1f} {plain / last:8.2f}", flush=True)
    print(f"\n{'model':10} {'size':>4} {'threads':>7} {'eval batch':>10} {'us/image':>8}")
    for name in args.models.split(","):
        for size in map(int, args.sizes.split(",")):
            for threads in map(int, args.threads.split(",")):
                for batch in (64, 256, 1024):
                    us = eval_us_per_image(name, size, batch, threads)
                    print(f"{name:10} {size:4} {threads:7} {batch:10} {us:8.0f}", flush=True)


if __name__ == "__main__":
    main()
