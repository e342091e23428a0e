"""What the flow reports per stage: whether DVC ran it, and what it cost."""

from __future__ import annotations

import subprocess
import sys

from headswap.workspace import children_cpu_seconds, stage_status


def test_status_reads_what_dvc_printed_about_the_stage():
    assert stage_status("train", "Running stage 'train':\n> headswap train\n") == "ran"
    assert stage_status("train", "Stage 'train' didn't change, skipping\n") == "up to date"
    restored = "Stage 'train' is cached - skipping run, checking out outputs\n"
    assert stage_status("train", restored) == "restored"
    # Another stage's line says nothing about this one.
    assert stage_status("train", "Running stage 'evaluate':\n") == "up to date"


def test_cpu_of_a_finished_child_process_is_counted():
    before = children_cpu_seconds()
    busy = "import time\nend = time.process_time() + 0.2\nwhile time.process_time() < end: pass"
    subprocess.run([sys.executable, "-c", busy], check=True)
    assert children_cpu_seconds() - before >= 0.2
