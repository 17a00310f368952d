"""Build hook: the web console (web/) is built by esbuild before the package is.

pyproject.toml holds all the metadata; this file only extends setuptools' `build_py` so
that `pip install .` (and building a wheel or an editable install) first brings
aetherd/transport/console_dist up to date with web/ (web/webbuild.py: `npm ci` when the
lock changed, then esbuild; nothing when the assets already match the sources, which is
how the Dockerfile installs assets built by its node stage). docs/architecture.md says why.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


class build_py_with_console(build_py):
    def run(self) -> None:
        path = HERE / "web" / "webbuild.py"
        if path.is_file():
            spec = importlib.util.spec_from_file_location("aetherd_webbuild", path)
            assert spec is not None and spec.loader is not None
            webbuild = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(webbuild)
            webbuild.build(log=lambda message: print(message, flush=True))
        # The package data list is computed lazily; make sure it sees the fresh assets.
        self.__dict__.pop("data_files", None)
        super().run()


setup(cmdclass={"build_py": build_py_with_console})
