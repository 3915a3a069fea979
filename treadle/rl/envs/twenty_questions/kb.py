"""The 20 Questions knowledge base: generated creatures, each an exact vector over a fixed attribute vocabulary.

Generated, not scraped, so every answer is exact and the data is offline, deterministic and ours to licence
(Apache-2.0, like the package). Entities are split once into train and test sets by name.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

# Attribute vocabulary: names and values are all distinct words, so a question's words identify one pair.
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "color": ("red", "blue", "green", "yellow"),
    "size": ("tiny", "small", "large", "huge"),
    "habitat": ("forest", "sea", "desert", "mountain"),
    "diet": ("plants", "meat", "insects", "fruit"),
    "legs": ("none", "two", "four", "six"),
    "flies": ("yes", "no"),
}

NUM_ENTITIES = 256
TEST_FRACTION = 0.25
_SEED = 20
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z")
_VOWELS = ("a", "e", "i", "o", "u")


@dataclass(frozen=True)
class Entity:
    name: str
    attributes: tuple[tuple[str, str], ...]  # (attribute, value) in ATTRIBUTES order

    def value(self, attribute: str) -> str:
        return dict(self.attributes)[attribute]


def _name(rng: random.Random) -> str:
    syllables = [rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(rng.choice((2, 3)))]
    return "".join(syllables).capitalize()


def build_entities(seed: int = _SEED, count: int = NUM_ENTITIES) -> list[Entity]:
    """`count` creatures with distinct names and distinct attribute vectors, the same on every machine."""
    rng = random.Random(seed)
    names: set[str] = set()
    vectors: set[tuple[str, ...]] = set()
    entities: list[Entity] = []
    while len(entities) < count:
        vector = tuple(rng.choice(values) for values in ATTRIBUTES.values())
        name = _name(rng)
        if vector in vectors or name in names or name.lower() in _VOCAB_WORDS:
            continue
        names.add(name)
        vectors.add(vector)
        entities.append(Entity(name, tuple(zip(ATTRIBUTES, vector, strict=True))))
    return entities


_VOCAB_WORDS = set(ATTRIBUTES) | {v for values in ATTRIBUTES.values() for v in values}


def split_entities(split: str) -> list[Entity]:
    """Train or test entities (disjoint; a fixed shuffle)."""
    entities = build_entities()
    order = list(range(len(entities)))
    random.Random(_SEED + 1).shuffle(order)
    n_test = int(len(entities) * TEST_FRACTION)
    chosen = order[:n_test] if split == "test" else order[n_test:]
    return [entities[i] for i in sorted(chosen)]
