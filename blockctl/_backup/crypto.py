"""Client-side encryption of a repository: one random master key per repository, wrapped by a
key derived (scrypt) from the user's secret, which comes from a 0600 file or from the caller's
memory — never from argv, the environment, a log or ``--json`` output.

The master key is two keys: ``enc`` (AES-256-GCM for chunks, indexes) and ``mac`` (HMAC-SHA256:
chunk digests, so equal plaintext is not visible as equal across keys, and manifests'
authentication). The repository's ``config.json`` holds the wrapped master key, the KDF
parameters and a key id (a MAC of a constant: it names the key without revealing it).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blockctl.errors import BackupCorrupt, BackupKeyError, ConfigError

ALGORITHM = "aes-256-gcm"
KDF = "scrypt"
#: scrypt cost: about 0.1 s and 32 MiB here; recorded per repository, so it can grow later.
SCRYPT_N = 1 << 15
SCRYPT_R = 8
SCRYPT_P = 1
NONCE = 12
TAG = 16
_WRAP_AAD = b"blockctl-repository-master-key-v1"
#: A secret file longer than this is not a passphrase or a key (a mistyped path to an image).
MAX_SECRET = 4096


def _aesgcm(key: bytes) -> Any:
    try:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    except ImportError as exc:  # pragma: no cover - a dependency of blockctl
        raise ConfigError(
            "encryption", "encrypted repositories need the 'cryptography' package"
        ) from exc
    return AESGCM(key)


@dataclass(frozen=True, slots=True)
class RepositoryKey:
    """The unwrapped master key of one repository. ``repr`` never shows the key bytes."""

    enc: bytes
    mac: bytes

    def __repr__(self) -> str:
        return f"RepositoryKey(id={self.key_id})"

    @property
    def key_id(self) -> str:
        return hmac.new(self.mac, b"blockctl-key-id", hashlib.sha256).hexdigest()[:16]

    def digest(self, data: bytes | bytearray | memoryview) -> bytes:
        return hmac.new(self.mac, data, hashlib.sha256).digest()

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        nonce = os.urandom(NONCE)
        return nonce + bytes(_aesgcm(self.enc).encrypt(nonce, plaintext, aad))

    def open(self, sealed: bytes, aad: bytes, what: str) -> bytes:
        from cryptography.exceptions import InvalidTag

        if len(sealed) < NONCE + TAG:
            raise BackupCorrupt(f"{what}: too short to be encrypted data (truncated?)")
        try:
            return bytes(_aesgcm(self.enc).decrypt(sealed[:NONCE], sealed[NONCE:], aad))
        except InvalidTag as exc:
            raise BackupCorrupt(
                f"{what}: authentication failed: the data was changed or damaged"
            ) from exc

    def sign(self, data: bytes) -> str:
        return hmac.new(self.mac, b"manifest\0" + data, hashlib.sha256).hexdigest()


def _kek(secret: bytes, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(secret, salt=salt, n=n, r=r, p=p, maxmem=256 << 20, dklen=32)


def new_key(secret: bytes) -> tuple[RepositoryKey, dict[str, Any]]:
    """A fresh master key and the ``encryption`` record of ``config.json`` that wraps it."""
    _check_secret(secret)
    master = os.urandom(64)
    salt = os.urandom(16)
    kek = _kek(secret, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    nonce = os.urandom(NONCE)
    wrapped = nonce + bytes(_aesgcm(kek).encrypt(nonce, master, _WRAP_AAD))
    key = RepositoryKey(enc=master[:32], mac=master[32:])
    record = {
        "algorithm": ALGORITHM,
        "kdf": {"name": KDF, "salt": salt.hex(), "n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P},
        "wrapped_key": wrapped.hex(),
        "key_id": key.key_id,
    }
    return key, record


def unwrap(record: dict[str, Any], secret: bytes, repo: Path) -> RepositoryKey:
    """The master key from ``config.json``'s ``encryption`` record, or :class:`BackupKeyError`
    before anything is read or written."""
    from cryptography.exceptions import InvalidTag

    try:
        kdf = record["kdf"]
        if record["algorithm"] != ALGORITHM or kdf["name"] != KDF:
            raise BackupKeyError(f"{repo}: unknown encryption {record['algorithm']}/{kdf['name']}")
        n, r, p = int(kdf["n"]), int(kdf["r"]), int(kdf["p"])
        if not (1 << 10 <= n <= 1 << 20 and 1 <= r <= 32 and 1 <= p <= 16):
            raise BackupKeyError(f"{repo}: KDF parameters out of bounds (n={n}, r={r}, p={p})")
        salt = bytes.fromhex(kdf["salt"])
        wrapped = bytes.fromhex(record["wrapped_key"])
        key_id = str(record["key_id"])
    except (KeyError, TypeError, ValueError) as exc:
        raise BackupKeyError(f"{repo}/config.json: malformed encryption record ({exc})") from exc
    _check_secret(secret)
    try:
        kek = _kek(secret, salt, n, r, p)
    except ValueError as exc:  # n not a power of two, or more memory than allowed
        raise BackupKeyError(f"{repo}/config.json: unusable KDF parameters ({exc})") from exc
    try:
        master = bytes(_aesgcm(kek).decrypt(wrapped[:NONCE], wrapped[NONCE:], _WRAP_AAD))
    except (InvalidTag, ValueError) as exc:
        raise BackupKeyError(
            f"wrong key for the repository {repo} (its key id is {key_id}); nothing was read "
            "or written: give the key file this repository was created with"
        ) from exc
    key = RepositoryKey(enc=master[:32], mac=master[32:])
    if key.key_id != key_id:
        raise BackupKeyError(f"{repo}: the key id does not match its config ({key_id})")
    return key


def _check_secret(secret: bytes) -> None:
    if len(secret) < 8:
        raise ConfigError("key", "a repository key or passphrase needs at least 8 bytes")


def read_key_file(path: Path) -> bytes:
    """The secret in a key file: owner-only (0600 or 0400, like ssh's keys), one line; the
    trailing newline is not part of it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError("key_file", f"cannot open the key file {path}: {exc.strerror}") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError("key_file", f"{path} is not a regular file")
        if info.st_mode & 0o077:
            raise ConfigError(
                "key_file",
                f"{path} is readable by others (mode {stat.S_IMODE(info.st_mode):04o}); "
                f"run chmod 600 {path}",
            )
        if info.st_uid != os.geteuid():
            raise ConfigError("key_file", f"{path} belongs to uid {info.st_uid}, not to you")
        data = os.read(fd, MAX_SECRET + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_SECRET:
        raise ConfigError("key_file", f"{path} is longer than {MAX_SECRET} bytes: not a key")
    return data.rstrip(b"\r\n")
