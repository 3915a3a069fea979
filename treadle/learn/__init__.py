"""The online learner of a deployed agent (client side: tinker SDK + HTTP, no server imports)."""

from treadle.learn.config import LearnConfig, parse_config
from treadle.learn.learner import Learner

__all__ = ["LearnConfig", "Learner", "parse_config"]
