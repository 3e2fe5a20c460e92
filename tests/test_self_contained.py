"""The suite needs nothing beside the repository: a user's clone has no ../shared."""

from __future__ import annotations

import pytest
from conftest import OUTSIDE_REPOSITORY, ROOT

pytestmark = pytest.mark.skipif(
    ROOT.parent == type(ROOT)(ROOT.anchor), reason="a clone at the file system's top"
)


def test_reading_beside_the_repository_is_caught() -> None:
    seen = len(OUTSIDE_REPOSITORY)
    with pytest.raises(FileNotFoundError):
        open(ROOT.parent / "shared" / "fixtures" / "no-such-file.json")  # noqa: SIM115
    try:
        assert OUTSIDE_REPOSITORY[seen:] == [str(ROOT.parent / "shared/fixtures/no-such-file.json")]
    finally:
        del OUTSIDE_REPOSITORY[seen:]  # caught on purpose: not this test's failure


def test_reading_inside_the_repository_is_not() -> None:
    seen = len(OUTSIDE_REPOSITORY)
    (ROOT / "tests" / "fixtures" / "pplcnet_paddleclas_state_dict_keys.json").read_text()
    assert OUTSIDE_REPOSITORY[seen:] == []
