"""Every module of `aetherd` imports on its own, in a fresh interpreter (no import cycles).

The test suite imports `aetherd.app` early, which would hide a cycle that only bites
when a module is imported first. One child interpreter imports each module in turn,
clearing every `aetherd` module from `sys.modules` before each import.
"""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import aetherd

CHILD = r"""
import importlib, json, sys, traceback
failures = {}
for name in json.loads(sys.argv[1]):
    for loaded in [m for m in sys.modules if m == "aetherd" or m.startswith("aetherd.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except BaseException:
        failures[name] = traceback.format_exc(limit=-3)
print(json.dumps(failures))
"""


def all_modules() -> list[str]:
    """Every module and package under aetherd/, found on disk (not by importing)."""
    root = Path(aetherd.__file__).parent
    names = ["aetherd"]
    for info in pkgutil.walk_packages([str(root)], prefix="aetherd."):
        names.append(info.name)
    return sorted(names)


def test_module_list_is_complete() -> None:
    names = all_modules()
    assert "aetherd.agent.runner" in names
    assert "aetherd.transport.routes" in names
    assert len(names) > 30


def test_every_module_imports_on_its_own() -> None:
    names = all_modules()
    result = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(names)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    failures = json.loads(result.stdout.strip().splitlines()[-1])
    assert failures == {}, "\n".join(f"{k}:\n{v}" for k, v in failures.items())
