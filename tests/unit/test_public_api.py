"""The public names are exactly the curated ones."""

from __future__ import annotations

import blockctl
import blockctl.errors
import blockctl.types


def test_all_is_complete_and_exists() -> None:
    for module in (blockctl, blockctl.errors, blockctl.types):
        public = {n for n in vars(module) if not n.startswith("_")}
        assert set(module.__all__) <= public, module.__name__
        assert len(module.__all__) == len(set(module.__all__))


def test_every_error_is_a_blockctl_error() -> None:
    for name in blockctl.errors.__all__:
        assert issubclass(getattr(blockctl.errors, name), blockctl.errors.BlockctlError)
