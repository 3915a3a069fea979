"""Checkpoint-name rules are the service's (`treadle.service.paths`): the REST routes' `<kind>/<name>` ids and
`tinker://` paths are checked there, and a bad one is a 400 naming the field and what is allowed."""

from __future__ import annotations

import pytest

from treadle.errors import UserError
from treadle.service import paths
from treadle.service.paths import CheckpointRef

ACTIONS = ("publish", "ttl")


def test_a_well_formed_checkpoint_names_its_parts() -> None:
    ref = paths.checkpoint_ref("run-1", "sampler_weights", "step:0010")
    assert ref == CheckpointRef("run-1", "sampler_weights", "step:0010")
    assert ref.path == "tinker://run-1/sampler_weights/step:0010"
    assert paths.parse_path(ref.path) == ref
    assert paths.checkpoint_id_parts("weights/a.b", ACTIONS) == ("weights", "a.b", None)
    assert paths.checkpoint_id_parts("weights/a/ttl", ACTIONS) == ("weights", "a", "ttl")


@pytest.mark.parametrize(
    ("kind", "name", "says"),
    [
        ("optimizer", "a", "kind must be one of weights, sampler_weights, external_weights, got 'optimizer'"),
        ("weights", "..", "checkpoint name must be 1-200 characters"),
        ("weights", "a/b", "checkpoint name must be 1-200 characters"),
        ("weights", "", "checkpoint name must be 1-200 characters"),
    ],
)
def test_a_bad_kind_or_name_is_refused_naming_the_field(kind: str, name: str, says: str) -> None:
    with pytest.raises(UserError) as e:
        paths.checkpoint_ref("run-1", kind, name)
    assert e.value.field == "checkpoint_id" and says in e.value.message


@pytest.mark.parametrize("rest", ["ckpt0", "weights", "weights/a/delete", "bogus/a", "weights/a/ttl/x"])
def test_a_malformed_checkpoint_id_says_the_expected_form(rest: str) -> None:
    with pytest.raises(UserError) as e:
        paths.checkpoint_id_parts(rest, ACTIONS)
    assert e.value.field == "checkpoint_id"
    assert e.value.message.startswith("checkpoint_id: must be <kind>/<name> with kind one of weights, ")
    assert "/publish, /ttl" in e.value.message and repr(rest) in e.value.message


def test_a_well_formed_id_with_a_bad_name_names_the_name_rule() -> None:
    with pytest.raises(UserError, match="checkpoint_id: checkpoint name must be"):
        paths.checkpoint_id_parts("weights/..", ACTIONS)


def test_the_route_answers_a_well_formed_id_with_405_and_a_malformed_one_with_400() -> None:
    from starlette.exceptions import HTTPException

    from treadle.api.tinker.routes.checkpoints import malformed_checkpoint

    with pytest.raises(HTTPException) as e:
        malformed_checkpoint("PATCH", "weights/a/publish")
    assert e.value.status_code == 405 and "method: PATCH" in e.value.detail
    with pytest.raises(UserError) as bad:
        malformed_checkpoint("GET", "ckpt0")
    assert bad.value.field == "checkpoint_id" and "/external_weights_urls" in bad.value.message
