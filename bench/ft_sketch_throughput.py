"""FT gradients + sketch throughput (issue 12): per-sample gradients of the last k tower blocks + head, sketched to
m, on ~56 KB JPEGs (bench/scale_pool.py's images), rows/s — the path of the FT sketch stage
(``skmm.gradients.clip_ft.ft_gradient_sketch``), with the batch it sizes for the device (``ft_batch_size``; an
explicit ``--batch`` wins). The first ``--warmup`` images run once before the timed pass (model build, kernels).
Images are decoded by the stage's decode workers (by default cores − 1 on CUDA and none on the CPU, or
``--decode-workers``);
``--compare-serial`` also times the same pass with ``decode_workers=0`` (decoding in the calling thread, the
stage before) and asserts that the rows are bitwise the same.

    .venv/bin/python bench/ft_sketch_throughput.py --device cuda --model ViT-B-32 --n 2048    # on a GPU machine
    .venv/bin/python bench/ft_sketch_throughput.py --model skmm-tiny-vit --n 64              # a CPU check
    .venv/bin/python bench/ft_sketch_throughput.py --model ViT-S-32 --n 256 --decode-workers 1 --compare-serial
→ bench/out/ft_sketch_throughput_<model>_<device>.json (or $SKMM_BENCH_OUT)
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import time

from _common import record
from embed_throughput import jpegs

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class _BatchLog(logging.Handler):
    """Collects the batch sizes ft_gradient_sketch logs (auto size, and any halving after an out-of-memory)."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n", type=int, default=2048, help="images in the timed pass")
    parser.add_argument("--warmup", type=int, default=64)
    parser.add_argument("--k", type=int, default=1, help="tower blocks whose gradients are taken")
    parser.add_argument("--sketch-dim", type=int, default=512)
    parser.add_argument("--classes", type=int, default=196)
    parser.add_argument("--batch", type=int, default=None, help="default: ft_batch_size for the device")
    parser.add_argument("--decode-workers", type=int, default=None,
                        help="default: cores - 1 on CUDA, 0 on the CPU")
    parser.add_argument("--compare-serial", action="store_true", help="also time decode_workers=0")
    args = parser.parse_args()

    import torch

    from skmm.gradients import clip_ft
    from skmm.models.clip import ClipSpec
    from storage.datasets import sample_id

    log = _BatchLog()
    clip_ft.log.addHandler(log)
    clip_ft.log.setLevel(logging.INFO)
    images = jpegs(args.warmup + args.n)
    ids = [sample_id(b) for b in images]
    spec = ClipSpec(model=args.model)
    common = {"k": args.k, "num_classes": args.classes, "sketch_dim": args.sketch_dim, "seed": 0,
              "batch_size": args.batch, "device": args.device}
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    start = time.perf_counter()
    clip_ft.ft_gradient_sketch(images[:args.warmup], ids[:args.warmup], spec, **common)
    sync()
    warm = time.perf_counter() - start
    log.lines.clear()

    def timed(decode_workers: int | None):
        start = time.perf_counter()
        out, _ = clip_ft.ft_gradient_sketch(images[args.warmup:], ids[args.warmup:], spec,
                                            decode_workers=decode_workers, **common)
        sync()
        return out, time.perf_counter() - start

    rows, wall = timed(args.decode_workers)
    serial: dict = {}
    if args.compare_serial:
        serial_rows, serial_wall = timed(0)
        serial = {"serial_wall_s": round(serial_wall, 2), "serial_rows_per_s": round(args.n / serial_wall, 1),
                  "ratio_workers_over_serial": round(serial_wall / wall, 3),
                  "bitwise_equal_serial": serial_rows.tobytes() == rows.tobytes()}
    batches = sorted({int(b) for line in log.lines for b in re.findall(r"batch(?: size)?\D{0,12}(\d+)", line)})
    result = {"model": args.model, "device": args.device, "k": args.k, "sketch_dim": args.sketch_dim,
              "classes": args.classes, "n": args.n, "rows_shape": list(rows.shape), "wall_s": round(wall, 2),
              "rows_per_s": round(args.n / wall, 1), "warmup_s": round(warm, 2), "batch_requested": args.batch,
              "decode_workers": clip_ft._ft_decode_workers(args.decode_workers, args.n,
                                                           args.batch or max(batches or [32]),
                                                           torch.device(args.device)), **serial,
              "batch_log": log.lines, "batches_seen": batches, "torch": torch.__version__,
              "device_name": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"}
    print(f"{args.model} k={args.k} m={args.sketch_dim} on {args.device}: {result['rows_per_s']} rows/s "
          f"({args.n} images in {wall:.1f} s; batch log: {log.lines})")
    if serial:
        print(f"  serial decoding: {serial['serial_rows_per_s']} rows/s; workers / serial "
              f"{serial['ratio_workers_over_serial']}")
    record(f"ft_sketch_throughput_{args.model}_{args.device.replace(':', '')}", result)
    assert serial.get("bitwise_equal_serial", True), "the decode workers changed the rows"


if __name__ == "__main__":
    main()
