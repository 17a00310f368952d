"""The registry's lazy channels: a channel module imported at its first use."""

from __future__ import annotations

import subprocess
import sys

import pytest

from aetherd.channels import CHANNELS
from aetherd.protocol.registry import Channel, LazyChannel, Registry

# A fresh interpreter: the suite has long imported every channel module.
CHILD = r"""
import sys
from aetherd.channels import CHANNELS
from aetherd.protocol.registry import Registry
registry = Registry(CHANNELS)
hooks = [h for c in registry.channels.values() for h in c.startup_hooks]
print("after-build", "aetherd.channels.git" in sys.modules, "aetherd.channels.agent" in sys.modules)
# The connect hooks: git has none and is not imported for them; agent has one.
names = [c.name for c in registry.channels.values() if c.connect_hooks]
print("after-connect", "aetherd.channels.git" in sys.modules, "aetherd.channels.agent" in sys.modules)
git = registry.channel("git")
print("handlers", sorted(git.handlers)[:2], git.require_request_id, "aetherd.protocol.git" in sys.modules)
print("connect", names)
"""


def test_lazy_channels_load_at_their_first_use() -> None:
    result = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "after-build False False"
    assert lines[1] == "after-connect False True"
    assert lines[2] == "handlers ['branches', 'checkout'] True True"
    assert lines[3] == "connect ['terminal', 'ports', 'agent']"


def test_a_loaded_lazy_channel_is_its_module_channel() -> None:
    from aetherd.channels import git

    lazy = next(c for c in CHANNELS if c.name == "git")
    assert isinstance(lazy, LazyChannel)
    lazy.load()
    assert lazy.loaded
    assert lazy.handlers is git.channel.handlers
    assert lazy.pushes == git.channel.pushes
    assert lazy.require_request_id is True
    assert Registry(CHANNELS).channel("git") is lazy


def test_a_lazy_channel_is_checked_when_it_loads() -> None:
    with pytest.raises(ValueError, match="is not the channel 'nope'"):
        LazyChannel("nope", "aetherd.channels.git").load()
    with pytest.raises(ValueError, match="declare connect=True"):
        LazyChannel("agent", "aetherd.channels.agent").load()
    with pytest.raises(ValueError, match="cannot have on_startup hooks"):
        LazyChannel("files", "aetherd.channels.files").load()
    with pytest.raises(ModuleNotFoundError):
        LazyChannel("x", "aetherd.channels.no_such_module").handlers  # noqa: B018
    # Its own attributes never import anything.
    lazy = LazyChannel("x", "aetherd.channels.no_such_module")
    assert (lazy.name, lazy.startup_hooks, lazy.connect_hooks, lazy.loaded) == ("x", [], [], False)
    assert isinstance(lazy, Channel)
