"""MD5 password authentication (AuthenticationMD5Password), sans-IO."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

from pgherd.shared.wire.scram import parse_verifier

# AuthenticationMD5Password carries a 4-byte salt (protocol-message-formats, "AuthenticationMD5Password").
SALT_BYTES = 4

# pg_authid stores MD5 passwords as "md5" + 32 lowercase hex digits; PostgreSQL treats any password
# of exactly that shape as already hashed (get_password_type), and so do we.
_MD5_HASH = re.compile(r"md5[0-9a-f]{32}")


def _md5_hex(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def md5_hash(user: str, password: str) -> str:
    """The pg_authid form of an MD5 password: "md5" + md5(password + user)."""
    return "md5" + _md5_hex(password.encode("utf-8") + user.encode("utf-8"))


def md5_response(user: str, password_or_hash: str, salt: bytes) -> bytes:
    """The PasswordMessage payload (without its NUL): "md5" + md5(md5hex(password + user) + salt).

    `password_or_hash` may be the plaintext or its stored "md5..." hash (from md5_hash).
    """
    if len(salt) != SALT_BYTES:
        raise ValueError(f"MD5 salt must be {SALT_BYTES} bytes, got {len(salt)}")
    if _MD5_HASH.fullmatch(password_or_hash):
        inner = password_or_hash[3:]
    else:
        inner = md5_hash(user, password_or_hash)[3:]
    return ("md5" + _md5_hex(inner.encode("ascii") + bytes(salt))).encode("ascii")


def md5_verify(user: str, stored: str, salt: bytes, response: bytes) -> bool:
    """Whether a client's PasswordMessage `response` matches `stored` (plaintext or "md5..." hash)."""
    # A SCRAM verifier cannot yield the MD5 hash; PostgreSQL runs SCRAM instead for such roles.
    try:
        parse_verifier(stored)
    except ValueError:
        pass
    else:
        return False
    return hmac.compare_digest(md5_response(user, stored, salt), bytes(response))


def random_salt() -> bytes:
    """A fresh salt for AuthenticationMD5Password."""
    return secrets.token_bytes(SALT_BYTES)
