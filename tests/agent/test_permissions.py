"""Destructive-command detection and the permission modes."""

from __future__ import annotations

import pytest

from aetherd.agent.permissions import approval_reason, destructive_command


@pytest.mark.parametrize(
    "command",
    [
        "rm -rf src",
        "rm -r -f ./build",
        "rm --recursive docs",
        "cd x && rm -Rf /",
        "sudo rm -rf /var/lib/app",
        "echo hi; rm -rf ~",
        "bash -c 'rm -rf src'",
        'sh -c "git push --force"',
        "eval rm -rf node_modules",
        "git push --force origin main",
        "git push -f",
        "git push origin +main",
        "git push --force-with-lease",
        "git reset --hard HEAD~3",
        "git clean -fdx",
        "git branch -D feature",
        "git checkout -- .",
        "find . -name '*.py' -delete",
        "mkfs.ext4 /dev/sda1",
        "dd if=/dev/zero of=/dev/sda",
        "shred secrets.txt",
        "rm -rf /tmp/../home/user",
        "ls | xargs rm -rf",
        "rm -rf 'unbalanced",
    ],
)
def test_destructive_commands_are_caught(command):
    assert destructive_command(command), command


@pytest.mark.parametrize(
    "command",
    [
        "ls -la",
        "rm file.txt",
        "rm -f a.log",
        "rm -rf /tmp/build-cache",
        "rm -rf /var/tmp/x /tmp/y",
        "git push origin main",
        "git reset HEAD file",
        "git checkout -b feature",
        "echo 'rm -rf /' > notes.txt",
        "grep -r 'git push --force' .",
        "python -m pytest -q",
        "find . -name '*.py'",
    ],
)
def test_ordinary_commands_pass(command):
    assert destructive_command(command) is None, command


def test_modes():
    write = {"path": "a", "content": "b"}
    assert approval_reason("full", "bash", {"command": "rm -rf /"}) is None
    assert approval_reason("auto", "bash", {"command": "rm -rf src"})
    assert approval_reason("auto", "write_file", write) is None
    assert approval_reason("auto", "bash", {"command": "ls"}) is None
    assert approval_reason("ask", "write_file", write)
    assert approval_reason("ask", "edit_file", write)
    assert approval_reason("ask", "bash", {"command": "ls"})
    assert approval_reason("ask", "read_file", {"path": "a"}) is None
    assert approval_reason("ask", "grep", {"pattern": "a"}) is None
