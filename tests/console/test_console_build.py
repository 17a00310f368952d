"""The web console's build: its unit tests (Vitest), its type check, its stamp, and the
protocol types it is generated from (web/src/protocol.gen.ts vs `aetherd schema`)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest

from tests.console.conftest import webbuild
from tests.support import REPO

WEB = REPO / "web"
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("console_assets")]


def _run(*argv: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=WEB, input=stdin, capture_output=True, text=True, timeout=180)


def test_vitest_unit_tests_pass():
    """The reconnecting socket and the resume bookkeeping (web/test/*.test.ts)."""
    node = shutil.which("node")
    assert node, "node is required for the console's unit tests"
    result = _run(node, "node_modules/vitest/vitest.mjs", "run", "--reporter=json")
    report = json.loads(result.stdout[result.stdout.index("{") :])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    names = {t["fullName"] for f in report["testResults"] for t in f["assertionResults"]}
    assert any("ReconnectingSocket" in n for n in names)
    assert any("ResumeTracker" in n for n in names)
    assert report["numFailedTests"] == 0 and report["numPassedTests"] >= 10


def test_typescript_type_checks():
    node = shutil.which("node")
    assert node
    result = _run(node, "node_modules/typescript/bin/tsc", "--noEmit", "-p", ".")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_built_assets_match_their_sources():
    assert webbuild.built_digest() == webbuild.inputs_digest()
    assert webbuild.is_fresh()


def _declarations(text: str) -> dict[str, str]:
    """Top-level `export` declarations of a generated file, by name."""
    blocks: dict[str, str] = {}
    for block in re.split(r"\n(?=(?:/\*\* [^\n]*\*/\n)?export )", text):
        match = re.search(r"^export (?:interface|type|const) (\w+)", block, re.M)
        if match:
            blocks[match[1]] = block.strip()
    return blocks


def _used_names() -> set[str]:
    """The generated names the console's sources import."""
    names: set[str] = set()
    for path in (WEB / "src").glob("*.ts"):
        for group in re.findall(
            r"import (?:type )?\{([^}]*)\} from \"\./protocol\.gen\"", path.read_text()
        ):
            names.update(n.strip().removeprefix("type ").strip() for n in group.split(","))
    return names - {""}


def _message_pairs(block: str) -> set[tuple[str, str]]:
    pairs: set[tuple[str, str]] = set()
    for channel, body in re.findall(r"^  (\w+): \{\n(.*?)^  \},", block, re.M | re.S):
        pairs.update((channel, t) for t in re.findall(r"^    \w+: \"(\w+)\",", body, re.M))
    return pairs


def test_protocol_types_agree_with_the_schema():
    """protocol.gen.ts is `npm run gen` output for the schema the console was built
    against: every generated type the console imports is unchanged in the daemon's current
    schema, and every (channel, type) in its MESSAGES still exists. (Other messages may
    change or appear without failing this; `npm run gen` picks them up.)"""
    node = shutil.which("node")
    assert node
    schema = subprocess.run(
        [sys.executable, "-m", "aetherd", "schema"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        cwd=REPO,
    ).stdout
    fresh = _run(node, "scripts/gen-protocol.mjs", stdin=schema)
    assert fresh.returncode == 0, fresh.stderr
    committed = _declarations((WEB / "src" / "protocol.gen.ts").read_text())
    generated = _declarations(fresh.stdout)
    used = _used_names()
    assert {"MESSAGES", "TerminalOutputPush"} <= used
    stale = sorted(
        name for name in used - {"MESSAGES"} if generated.get(name) != committed.get(name)
    )
    assert not stale, f"run `npm run gen` in web/ (changed or removed: {stale[:10]})"
    pairs = _message_pairs(committed["MESSAGES"])
    assert ("terminal", "output") in pairs and len(pairs) > 40
    missing = pairs - _message_pairs(generated["MESSAGES"])
    assert not missing, f"messages the console knows are gone from the schema: {missing}"
