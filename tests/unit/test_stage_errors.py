"""A stage that fails reaches the driver (a Prefect flow run's state) as one clear line."""

from __future__ import annotations

import sys

import pytest

from headswap.workspace import StageError, run_command


def _fails_with(tmp_path, *lines: str) -> list[str]:
    """A command that prints ``lines`` and exits 1, as a failed `dvc repro` does."""
    script = tmp_path / "stage.py"
    printed = "".join(f"print({line!r})\n" for line in lines)
    script.write_text(f"import sys\n{printed}sys.exit(1)\n")
    return [sys.executable, str(script)]


def test_a_headswap_error_line_is_the_whole_message(tmp_path):
    command = _fails_with(
        tmp_path,
        "Running stage 'ingest':",
        "error: data.source: '/nowhere' is not a directory",
        "ERROR: failed to reproduce 'ingest'",
    )
    with pytest.raises(StageError) as raised:
        run_command(command)
    message = str(raised.value)
    assert "\n" not in message
    assert message.endswith("failed: data.source: '/nowhere' is not a directory")


def test_other_failures_keep_the_tail_of_the_output(tmp_path):
    command = _fails_with(tmp_path, "Traceback (most recent call last):", "ValueError: boom")
    with pytest.raises(StageError, match=r"(?s)failed \(exit 1\):\n.*ValueError: boom"):
        run_command(command)
