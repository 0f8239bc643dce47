"""Choosing the QEMU programs: environment, then the configuration file, then PATH."""

from __future__ import annotations

from pathlib import Path

import pytest

from blockctl import _binaries
from blockctl.errors import ConfigError


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for var in (*_binaries.ENV_VARS.values(), _binaries.PREFIX_VAR):
        monkeypatch.delenv(var, raising=False)
    config = tmp_path / "config.toml"
    monkeypatch.setenv(_binaries.CONFIG_VAR, str(config))
    return config


def test_default_is_path_lookup() -> None:
    assert _binaries.qemu_img() == "qemu-img"


def test_config_file_prefix_and_paths(clean_env: Path) -> None:
    clean_env.write_text('[qemu]\nprefix = "/opt/q10"\nqemu-img = "/usr/local/bin/my-img"\n')
    assert _binaries.qemu_system() == "/opt/q10/bin/qemu-system-x86_64"
    assert _binaries.qemu_img() == "/usr/local/bin/my-img"


def test_environment_wins(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clean_env.write_text('[qemu]\nprefix = "/opt/q10"\n')
    monkeypatch.setenv("BLOCKCTL_QEMU_PREFIX", "/opt/other")
    assert _binaries.qemu_nbd() == "/opt/other/bin/qemu-nbd"
    monkeypatch.setenv("BLOCKCTL_QEMU_NBD", "/x/qemu-nbd")
    assert _binaries.qemu_nbd() == "/x/qemu-nbd"


@pytest.mark.parametrize("text", ['[qemu]\nqemu-imgg = "/x"\n', "[qemu]\nprefix = 3\n", "[qemu"])
def test_bad_config_is_a_clear_error(clean_env: Path, text: str) -> None:
    clean_env.write_text(text)
    with pytest.raises(ConfigError, match=str(clean_env)):
        _binaries.qemu_io()
