"""The docs keep up with the code: every setting is in the README's table."""

from __future__ import annotations

import re

from aetherd.settings import Settings, env_name, flag_name
from tests.support import REPO


def test_every_setting_is_documented_in_the_readme():
    readme = (REPO / "README.md").read_text()
    rows = [line for line in readme.splitlines() if line.startswith("| `--")]
    documented = " ".join(rows)
    missing = []
    for name in Settings.model_fields:
        flag = flag_name(name)
        var = env_name(name)
        parts = var.split("_")
        wildcards = ["_".join(parts[:i]) + "_*" for i in range(2, len(parts))]
        if not re.search(re.escape(flag) + r"\b(?!-)", documented) or not (
            var in documented or any(w in documented for w in wildcards)
        ):
            missing.append(flag)
    assert missing == []
