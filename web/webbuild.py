"""Build the web console (web/) into aetherd/transport/console_dist, when it is stale.

Standard library only: setup.py loads this file by path inside pip's isolated build
environment (where aetherd's own dependencies are absent), and the console tests load it
too. `python web/webbuild.py [--force]` runs it by hand.

Freshness: the build writes `stamp.json` holding a digest of its inputs (web/src, the
build script, package.json, package-lock.json, tsconfig.json). The same digest is
computed here; equal digests mean the assets match the sources and nothing runs (this is
how the Dockerfile's Python stage installs assets built by its node stage, without node).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

WEB = Path(__file__).resolve().parent
REPO = WEB.parent
OUT = REPO / "aetherd" / "transport" / "console_dist"
INPUT_FILES = ("build.mjs", "package.json", "package-lock.json", "tsconfig.json")
INPUT_DIRS = ("src",)
ASSETS = ("index.html", "app.js", "app.css")
SKIP_ENV = "AETHERD_SKIP_WEB_BUILD"


def input_files() -> list[Path]:
    """The files whose bytes decide the build's output, sorted by relative path."""
    files = [WEB / name for name in INPUT_FILES if (WEB / name).is_file()]
    for folder in INPUT_DIRS:
        files += [p for p in (WEB / folder).rglob("*") if p.is_file()]
    return sorted(files, key=lambda p: p.relative_to(WEB).as_posix())


def inputs_digest() -> str:
    """sha256 over each input's relative path and bytes (build.mjs computes the same)."""
    digest = hashlib.sha256()
    for path in input_files():
        digest.update(path.relative_to(WEB).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def built_digest() -> str | None:
    """The digest recorded by the last build, or None when there are no complete assets."""
    if not all((OUT / name).is_file() for name in ASSETS):
        return None
    try:
        return str(json.loads((OUT / "stamp.json").read_text())["inputs"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def is_fresh() -> bool:
    """True when the built assets exist and were built from the current sources."""
    if not (WEB / "src").is_dir():  # an sdist or a copy without web/: take what is built
        return built_digest() is not None
    return built_digest() == inputs_digest()


def build(force: bool = False, log=print) -> bool:
    """Build when stale (or forced). Returns True when a build ran."""
    if not force and is_fresh():
        return False
    if os.environ.get(SKIP_ENV):
        log(f"web console: {SKIP_ENV} is set, not building it (the console page will say so)")
        return False
    npm = shutil.which("npm")
    node = shutil.which("node")
    if not npm or not node:
        raise RuntimeError(
            "the web console (web/) must be built, and that needs Node >= 20 and npm on PATH; "
            f"install them, or set {SKIP_ENV}=1 to install without the console"
        )
    lock = WEB / "package-lock.json"
    marker = WEB / "node_modules" / ".package-lock.json"
    if not marker.is_file() or marker.stat().st_mtime < lock.stat().st_mtime:
        log("web console: npm ci")
        subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=WEB, check=True
        )
    log("web console: esbuild")
    subprocess.run([node, "build.mjs"], cwd=WEB, check=True)
    if built_digest() != inputs_digest():
        raise RuntimeError("web console: the build finished but its stamp does not match")
    return True


if __name__ == "__main__":
    ran = build(force="--force" in sys.argv[1:])
    print("web console: built" if ran else "web console: up to date")
