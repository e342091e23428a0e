"""Peak RSS and CPU time of scoring test images with a headswap ONNX model, per ONNX Runtime
memory setting and batch size: what promotion's scoring settings were chosen from.

    python benchmarks/promote_memory.py MODEL.onnx --manifest data/prepared/manifest.csv \
        --raw data/raw --batch 8 --batches 8 --arena 1 --pattern 0

Run one configuration per process: the peak (VmHWM) is the process's own.
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import numpy as np


def vm_hwm_mib() -> float:
    """The process's peak resident set (VmHWM), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    import onnxruntime as ort

    from headswap.imaging import load_model_input
    from headswap.manifest import read_manifest
    from headswap.predict import model_input

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--manifest", type=Path, default=Path("data/prepared/manifest.csv"))
    parser.add_argument("--raw", type=Path, default=Path("data/raw"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--arena", type=int, choices=(0, 1), default=1)
    parser.add_argument("--pattern", type=int, choices=(0, 1), default=0)
    args = parser.parse_args()

    options = ort.SessionOptions()
    options.enable_cpu_mem_arena = bool(args.arena)
    options.enable_mem_pattern = bool(args.pattern)
    session = ort.InferenceSession(str(args.model), options, providers=["CPUExecutionProvider"])
    _, size, interpolation = model_input(session.get_modelmeta().custom_metadata_map, args.model)
    rows = [row for row in read_manifest(args.manifest) if row["split"] == "test"]
    files = [args.raw / row["path"] for row in rows][: args.batch * args.batches]
    cpu, wall = time.process_time(), time.perf_counter()
    for start in range(0, len(files), args.batch):
        pixels = np.stack(
            [load_model_input(f, size, interpolation) for f in files[start:][: args.batch]]
        )
        session.run(["probabilities", "label"], {"pixels": pixels})
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    print(
        f"batch={args.batch} arena={args.arena} pattern={args.pattern}: {len(files)} images, "
        f"CPU {cpu:.1f} s ({cpu / len(files):.3f} s/image), wall {wall:.1f} s, "
        f"peak RSS {vm_hwm_mib():.0f} MiB"
    )


if __name__ == "__main__":
    main()
