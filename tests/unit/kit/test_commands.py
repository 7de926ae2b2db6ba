"""A helper binary run bounded: its answer, its exit code, a kill when it hangs."""

from __future__ import annotations

import pytest

from aiodp.kit import commands


async def test_commands_answer_code_and_bounded_output() -> None:
    code, out = await commands.run(["sh", "-c", "echo hi; echo err >&2; exit 3"], within=10)
    assert (code, out) == (3, "hi\nerr")
    _, big = await commands.run(["sh", "-c", "head -c 100000 /dev/zero | tr '\\0' x"],
                                within=10, limit=10)  # fmt: skip
    assert big == "x" * 10
    _, echoed = await commands.run(["cat"], within=10, stdin="quit\n")
    assert echoed == "quit"


async def test_commands_a_hang_is_killed_and_a_missing_binary_raises() -> None:
    with pytest.raises(TimeoutError):
        await commands.run(["sleep", "30"], within=0.2)
    with pytest.raises(FileNotFoundError):
        await commands.run(["/nonexistent/helper"], within=1)
