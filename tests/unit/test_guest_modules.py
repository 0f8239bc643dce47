"""The guest's modules lose their appended signature (``_guest._strip_module_signature``)."""

from __future__ import annotations

import struct

import pytest

from blockctl import _guest
from blockctl.errors import BlockctlError

ELF = b"\x7fELF" + bytes(range(256)) * 4
MARKER = b"~Module signature appended~\n"


def signed(body: bytes, signature: bytes, signer: bytes = b"", key_id: bytes = b"") -> bytes:
    """``body`` signed as the kernel's ``sign-file`` appends it: signer, key id, signature,
    ``struct module_signature`` (PKCS#7: id type 2, signer and key id lengths 0), marker."""
    info = struct.pack(">BBBBB3xI", 0, 0, 2, len(signer), len(key_id), len(signature))
    return body + signer + key_id + signature + info + MARKER


@pytest.mark.parametrize("signature", [b"\x30\x82" + b"s" * 700, b"x"])
def test_a_signed_module_is_its_body_again(signature: bytes) -> None:
    assert _guest._strip_module_signature(signed(ELF, signature)) == ELF


def test_signer_and_key_id_go_too() -> None:
    assert _guest._strip_module_signature(signed(ELF, b"sig", b"signer", b"keyid")) == ELF


def test_an_unsigned_module_is_unchanged() -> None:
    assert _guest._strip_module_signature(ELF) == ELF


def test_a_trailer_longer_than_the_file_is_refused() -> None:
    bad = ELF[:8] + struct.pack(">BBBBB3xI", 0, 0, 2, 0, 0, 1 << 20) + MARKER
    with pytest.raises(BlockctlError, match="malformed"):
        _guest._strip_module_signature(bad)
