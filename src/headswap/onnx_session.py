"""The one place headswap opens an ONNX Runtime session (CPU provider)."""

from __future__ import annotations

import os
from pathlib import Path


def cpu_cores() -> int:
    """Cores this process may run on (the affinity mask, not the machine's total)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def open_session(
    model: Path | bytes, threads: int | None = None, throughput: bool = False, lean: bool = False
):
    """An ``onnxruntime.InferenceSession`` on the CPU provider over a file or serialized model.

    ``throughput`` tunes it for long batched runs (the features stage): every graph optimisation,
    one intra-op thread per core (or ``threads``), sequential execution and no spinning. The
    default is ONNX Runtime's own settings, which suit one-off scoring (parity, predict).

    ``lean`` (ONNX Runtime's settings otherwise) turns off the memory pattern, for long batched
    runs whose peak memory must stay bounded (promotion's scoring). The pattern plans one block
    for a run's activations on top of the memory arena, which about doubled the peak on the
    default ensemble (batch 8: 0.95 -> 0.61 GB, at about the same CPU time per image). The arena
    stays on: without it every run allocates and frees its buffers again, which cost 40-80% more
    CPU per image there (benchmarks/README.md, "Promotion").
    """
    import onnxruntime as ort

    source = model if isinstance(model, bytes) else str(model)
    if lean:
        options = ort.SessionOptions()
        options.enable_mem_pattern = False
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    if not throughput:
        return ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads or cpu_cores()
    options.inter_op_num_threads = 1
    # No busy-waiting between ops: spinning threads steal the cores the decoding workers need
    # (and, on a shared machine, everyone else's); measured here, +20% images/s without it.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
