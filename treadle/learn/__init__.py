"""The online learner of a deployed agent (client side: tinker SDK + HTTP, no server imports).

`Learner` loads the tinker SDK, so it is imported on first use: `treadle learn`'s CLI module lives in this
package, and every `treadle` command (even `--help`) imports it to register its subcommand.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from treadle.learn.config import LearnConfig, parse_config

if TYPE_CHECKING:
    from treadle.learn.learner import Learner


def __getattr__(name: str) -> Any:
    if name == "Learner":
        from treadle.learn.learner import Learner

        return Learner
    raise AttributeError(f"module 'treadle.learn' has no attribute {name!r}")


__all__ = ["LearnConfig", "Learner", "parse_config"]
