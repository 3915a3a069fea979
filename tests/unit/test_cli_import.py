"""`treadle --help` (and every subcommand's parser) must not load torch or the tinker SDK: each command group
registers from its own module, and those modules import heavy libraries only inside their commands."""

from __future__ import annotations

import subprocess
import sys


def test_building_the_cli_parser_imports_no_heavy_library() -> None:
    code = (
        "import sys; from treadle.cli import build_parser; build_parser(); "
        "print(sorted(m for m in ('torch', 'tinker', 'tinker_cookbook', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
