"""Encryption at rest for hypervisor credentials (Fernet: AES-128-CBC + HMAC-SHA256).

The key is kept apart from SECRET_KEY: ``PORTAL_FIELD_KEY`` in the environment (a urlsafe base64
Fernet key), else a key file ``<PORTAL_DATA_DIR>/field.key`` created on first use with mode 0600.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from functools import lru_cache

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from django.conf import settings

PREFIX = "fernet:"


def key_from(env_var: str, filename: str, generate: Callable[[], bytes]) -> bytes:
    """A secret key: from the environment, else from a file under PORTAL_DATA_DIR created on first
    use, readable by its owner only."""
    key = os.environ.get(env_var, "").encode()
    if key:
        return key
    path = settings.DATA_DIR / filename
    if not path.exists():
        # Written under a private name, then linked into place: readers never see it half-written,
        # and if another process linked its key first, both use that one.
        tmp = path.with_name(f".{filename}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(generate())
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
        tmp.unlink()
    return path.read_bytes().strip()


@lru_cache(maxsize=1)
def _fernet() -> Fernet:
    return Fernet(key_from("PORTAL_FIELD_KEY", "field.key", Fernet.generate_key))


def encrypt(plain: str) -> str:
    return "" if not plain else PREFIX + _fernet().encrypt(plain.encode()).decode()


def decrypt(stored: str) -> str:
    if not stored:
        return ""
    if not stored.startswith(PREFIX):
        raise ValueError("the stored secret is not encrypted with the portal's field key")
    try:
        return _fernet().decrypt(stored[len(PREFIX):].encode()).decode()
    except InvalidToken:
        raise ValueError("the stored secret cannot be decrypted with the current field key") from None


def rotate_token(stored: str, new_key: bytes) -> str:
    """The same secret encrypted under ``new_key`` (read with the current key)."""
    if not stored:
        return ""
    return PREFIX + MultiFernet([Fernet(new_key), _fernet()]).rotate(stored[len(PREFIX):].encode()).decode()


def install_key(new_key: bytes) -> bool:
    """Make ``new_key`` the current key. True when it was written to the key file; False when the
    key comes from PORTAL_FIELD_KEY, which the operator then changes."""
    _fernet.cache_clear()
    if os.environ.get("PORTAL_FIELD_KEY"):
        return False
    path = settings.DATA_DIR / "field.key"
    tmp = path.with_name(f".field.key.{os.getpid()}.new")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(new_key)
    os.replace(tmp, path)
    _fernet.cache_clear()
    return True
