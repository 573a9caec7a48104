"""Client authentication to pgherd: SCRAM-SHA-256, MD5, cleartext and trust.

Flows: PostgreSQL documentation, "Message Flow: Start-up" and "SASL Authentication".
Unknown users and databases go through the same exchange and get the same
error as a wrong password (28P01), so names cannot be probed.
"""

from __future__ import annotations

import secrets

from pgherd.shared.wire import errors as E
from pgherd.shared.wire import messages as M
from pgherd.shared.wire import protocol as P
from pgherd.shared.wire.md5 import md5_verify, random_salt
from pgherd.shared.wire.scram import (MECHANISM, ScramError, ScramServer, ScramVerifier,
                                      make_verifier, parse_verifier)

# A verifier for users that do not exist, so their SCRAM exchange looks real
# (PostgreSQL does the same "mock authentication"). Made once per process.
_MOCK_VERIFIER: ScramVerifier | None = None
# Verifiers made from plaintext passwords, cached per password: PBKDF2 at 4096
# iterations costs milliseconds, too much to redo on every login.
_VERIFIER_CACHE: dict[str, ScramVerifier] = {}
# Bound the cache: passwords come from config, so this only guards against reload churn.
_VERIFIER_CACHE_MAX = 10000


def _mock_verifier() -> ScramVerifier:
    global _MOCK_VERIFIER
    if _MOCK_VERIFIER is None:
        _MOCK_VERIFIER = make_verifier(secrets.token_hex(16))
    return _MOCK_VERIFIER


def verifier_for(password: str | None, password_hash: str | None) -> ScramVerifier | None:
    if password_hash and password_hash.startswith("SCRAM-SHA-256$"):
        return parse_verifier(password_hash)
    if password is None:
        return None
    v = _VERIFIER_CACHE.get(password)
    if v is None:
        if len(_VERIFIER_CACHE) >= _VERIFIER_CACHE_MAX:
            _VERIFIER_CACHE.clear()
        v = _VERIFIER_CACHE[password] = make_verifier(password)
    return v


def admin_disabled() -> E.PgError:
    """The admin console refuses everyone while no [admin] password is configured."""
    return E.PgError(E.INVALID_AUTHORIZATION,
                     "the admin console is disabled: no [admin] password is configured",
                     hint="set [admin] password (and user) in pgherd.toml, then RELOAD or restart",
                     fatal=True)


def auth_failed(user: str) -> E.PgError:
    return E.PgError(E.INVALID_PASSWORD, f'password authentication failed for user "{user}"', fatal=True)


async def authenticate(session, user: str, user_cfg, auth_type: str) -> None:
    """Run the exchange with the client; raise PgError(28P01) on failure.

    user_cfg is the users.toml entry, or None for an unknown user/database.
    session provides `send(bytes)` and `read_message() -> (type, body)`.
    """
    password = getattr(user_cfg, "password", None) if user_cfg else None
    password_hash = getattr(user_cfg, "password_hash", None) if user_cfg else None
    if auth_type == "trust":
        if user_cfg is None:
            raise auth_failed(user)
        return
    if auth_type == "scram":
        await _scram(session, user, verifier_for(password, password_hash) if user_cfg else None)
    elif auth_type == "md5":
        salt = random_salt()
        await session.send(M.auth_md5(salt))
        response = await _password_message(session)
        stored = password if password is not None else password_hash
        if user_cfg is None or stored is None or stored.startswith("SCRAM-SHA-256$"):
            raise auth_failed(user)
        if not md5_verify(user, stored, salt, response):
            raise auth_failed(user)
    elif auth_type in ("plain", "password", "cleartext"):
        await session.send(M.auth_cleartext())
        response = await _password_message(session)
        if user_cfg is None or not _check_plain(user, response, password, password_hash):
            raise auth_failed(user)
    else:
        raise E.PgError(E.INVALID_AUTHORIZATION, f"unsupported auth_type {auth_type!r}", fatal=True)


def _check_plain(user: str, response: bytes, password: str | None, password_hash: str | None) -> bool:
    try:
        given = response.decode()
    except UnicodeDecodeError:
        return False
    if password is not None:
        return secrets.compare_digest(given.encode(), password.encode())
    if password_hash and password_hash.startswith("md5"):
        from pgherd.shared.wire.md5 import md5_hash
        return secrets.compare_digest(md5_hash(user, given), password_hash)
    if password_hash and password_hash.startswith("SCRAM-SHA-256$"):
        v = parse_verifier(password_hash)
        return secrets.compare_digest(make_verifier(given, v.salt, v.iterations).stored_key, v.stored_key)
    return False


async def _password_message(session) -> bytes:
    t, body = await session.read_message()
    if t != P.F_PASSWORD:
        raise E.ProtocolViolation(f"expected password response, got message type {chr(t)!r}")
    return M.read_password(body)


async def _scram(session, user: str, verifier: ScramVerifier | None) -> None:
    real = verifier is not None
    server = ScramServer(verifier or _mock_verifier())
    await session.send(M.auth_sasl([MECHANISM]))
    t, body = await session.read_message()
    if t != P.F_PASSWORD:
        raise E.ProtocolViolation(f"expected SASL response, got message type {chr(t)!r}")
    try:
        mech, data = M.read_sasl_initial_response(body)
    except ValueError as exc:
        raise E.ProtocolViolation(f"malformed SASLInitialResponse: {exc}") from None
    if mech not in (MECHANISM,):
        raise E.PgError(E.PROTOCOL_VIOLATION,
                        "client selected an invalid SASL authentication mechanism", fatal=True)
    try:
        await session.send(M.auth_sasl_continue(server.server_first(data)))
        t, body = await session.read_message()
        if t != P.F_PASSWORD:
            raise E.ProtocolViolation(f"expected SASL response, got message type {chr(t)!r}")
        final = server.server_final(bytes(body))
    except ScramError as exc:
        if not real or exc.sqlstate == E.INVALID_PASSWORD:
            raise auth_failed(user) from None
        raise E.PgError(exc.sqlstate, str(exc), fatal=True) from None
    if not real:
        raise auth_failed(user)
    await session.send(M.auth_sasl_final(final))
