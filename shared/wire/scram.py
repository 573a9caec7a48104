"""SCRAM-SHA-256 authentication (RFC 5802, RFC 7677) with SASLprep (RFC 4013), sans-IO."""

from __future__ import annotations

import base64
import enum
import functools
import hashlib
import hmac
import re
import secrets
import stringprep
import unicodedata
from dataclasses import dataclass, field

MECHANISM = "SCRAM-SHA-256"

# PostgreSQL's default scram_iterations; RFC 7677 §4 asks for at least 4096.
DEFAULT_ITERATIONS = 4096

# scram_iterations is a C int in PostgreSQL, so no real server or rolpassword has more.
MAX_ITERATIONS = 2**31 - 1

# Random bytes per nonce, as PostgreSQL and libpq use (SCRAM_RAW_NONCE_LEN): 144 bits, which
# base64 encodes to 24 printable characters with no padding.
NONCE_BYTES = 18

# Salt length of new verifiers, as PostgreSQL uses (SCRAM_DEFAULT_SALT_LEN).
SALT_BYTES = 16

# PBKDF2 at 4096 iterations costs a few ms of CPU. A pool reconnecting to the same server gets the
# same salt every time, and ScramServer.from_password reuses one salt per password, so the derived
# keys are cached; 256 covers the users and servers of any sensible config.
DERIVED_KEYS_CACHE_SIZE = 256

# ScramServer.from_password keeps one verifier per plaintext password, so repeated logins by
# users.toml users skip PBKDF2; bounded so a config with many users cannot grow it forever.
VERIFIER_CACHE_SIZE = 1024

# SQLSTATEs for ScramError (PostgreSQL errcodes.txt).
PROTOCOL_VIOLATION = "08P01"
INVALID_PASSWORD = "28P01"
FEATURE_NOT_SUPPORTED = "0A000"

_KEY_BYTES = hashlib.sha256().digest_size  # RFC 7677 §3: H() is SHA-256, so keys are 32 bytes
_GS2_NO_CHANNEL_BINDING = "n,,"  # RFC 5802 §7: gs2-header without channel binding or authzid

# RFC 5802 §7: printable = %x21-2B / %x2D-7E (any ASCII graphic character but ",").
_PRINTABLE = re.compile(r"[\x21-\x2b\x2d-\x7e]+")
# RFC 5802 §7: base64 as in RFC 4648 §4, with padding.
_BASE64 = re.compile(r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?")
# RFC 5802 §7: posit-number = %x31-39 *DIGIT
_POSITIVE_NUMBER = re.compile(r"[1-9][0-9]{0,9}")


class ScramError(Exception):
    """A SCRAM exchange failed; `sqlstate` is the SQLSTATE to report to a client."""

    def __init__(self, message: str, sqlstate: str = PROTOCOL_VIOLATION) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


# --- SASLprep (RFC 4013) -----------------------------------------------------------------------

# RFC 4013 §2.3: prohibited output, tables of RFC 3454 appendix C.
_PROHIBITED_TABLES = (
    ("non-ASCII space", stringprep.in_table_c12),
    ("control character", stringprep.in_table_c21_c22),
    ("private use character", stringprep.in_table_c3),
    ("non-character code point", stringprep.in_table_c4),
    ("surrogate code point", stringprep.in_table_c5),
    ("character inappropriate for plain text", stringprep.in_table_c6),
    ("character inappropriate for canonical representation", stringprep.in_table_c7),
    ("change display property or deprecated character", stringprep.in_table_c8),
    ("tagging character", stringprep.in_table_c9),
)


def _map(text: str) -> str:
    """RFC 4013 §2.1: non-ASCII spaces (C.1.2) become SPACE, B.1 characters are dropped."""
    out = []
    for ch in text:
        if stringprep.in_table_c12(ch):
            out.append(" ")
        elif not stringprep.in_table_b1(ch):
            out.append(ch)
    return "".join(out)


def _check(text: str) -> None:
    """RFC 4013 §2.3-2.5: prohibited output, bidi rules, unassigned code points; ValueError if any."""
    for ch in text:
        # RFC 4013 §2.5: SASLprep is for stored strings, so unassigned code points (A.1) are
        # prohibited (RFC 3454 §7).
        if stringprep.in_table_a1(ch):
            raise ValueError(f"SASLprep: unassigned code point U+{ord(ch):04X}")
        for what, in_table in _PROHIBITED_TABLES:
            if in_table(ch):
                raise ValueError(f"SASLprep: prohibited {what} U+{ord(ch):04X}")
    # RFC 4013 §2.4 applies RFC 3454 §6: a string with any RandALCat (D.1) character has no LCat
    # (D.2) character, and starts and ends with a RandALCat character.
    if any(stringprep.in_table_d1(ch) for ch in text):
        if any(stringprep.in_table_d2(ch) for ch in text):
            raise ValueError("SASLprep: mixes right-to-left and left-to-right characters")
        if not (stringprep.in_table_d1(text[0]) and stringprep.in_table_d1(text[-1])):
            raise ValueError("SASLprep: right-to-left text must start and end with a right-to-left character")


def saslprep(text: str) -> str:
    """Prepare `text` with SASLprep (RFC 4013); ValueError on prohibited output or bidi violations."""
    mapped = _map(text)
    # RFC 4013 §2.2: normalization form KC, with the Unicode 3.2 tables of RFC 3454.
    normalized = unicodedata.ucd_3_2_0.normalize("NFKC", mapped)
    _check(normalized)
    return normalized


def _to_bytes(password: str | bytes) -> bytes:
    if isinstance(password, (bytes, bytearray, memoryview)):
        return bytes(password)
    try:
        # A str that came from undecodable bytes (os.fsdecode, surrogateescape) gets its bytes back.
        return password.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return password.encode("utf-8", "surrogatepass")


def normalize_password(password: str | bytes) -> bytes:
    """The bytes PostgreSQL feeds to PBKDF2 for `password`: SASLprep if possible, else the raw bytes.

    This follows PostgreSQL's pg_saslprep (used by the server and libpq), which differs from the
    letter of RFC 4013 in ways that change the result, so SCRAM keys match PostgreSQL's own:
    pure ASCII is used as is, invalid UTF-8 or a failed preparation falls back to the raw bytes,
    an empty result is a failure, the prohibited/bidi checks look at the mapped string before
    normalization, and normalization uses current Unicode tables.
    """
    raw = _to_bytes(password)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw
    if text.isascii():
        return raw
    mapped = _map(text)
    if not mapped:
        return raw
    try:
        _check(mapped)
    except ValueError:
        return raw
    return unicodedata.normalize("NFKC", mapped).encode("utf-8")


# --- keys and verifiers (RFC 5802 §3) -------------------------------------------------------


def _hmac(key: bytes, message: bytes) -> bytes:
    return hmac.digest(key, message, "sha256")


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


def _b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@functools.lru_cache(maxsize=DERIVED_KEYS_CACHE_SIZE)
def _derive_keys(password: bytes, salt: bytes, iterations: int) -> tuple[bytes, bytes]:
    """RFC 5802 §3: (ClientKey, ServerKey) from SaltedPassword := Hi(password, salt, i)."""
    # RFC 5802 §2.2: Hi() is PBKDF2 with HMAC as the PRF; RFC 7677 §3: HMAC-SHA-256.
    salted = hashlib.pbkdf2_hmac("sha256", password, salt, iterations)
    return _hmac(salted, b"Client Key"), _hmac(salted, b"Server Key")


def _check_iterations(iterations: int) -> None:
    if isinstance(iterations, bool) or not isinstance(iterations, int) or not 1 <= iterations <= MAX_ITERATIONS:
        raise ValueError(f"SCRAM iteration count must be an integer from 1 to {MAX_ITERATIONS}, got {iterations!r}")


@dataclass(frozen=True)
class ScramVerifier:
    """What a server stores to check a SCRAM-SHA-256 password (RFC 5802 §3), not the password."""

    iterations: int
    salt: bytes
    stored_key: bytes = field(repr=False)  # H(ClientKey)
    server_key: bytes = field(repr=False)  # HMAC(SaltedPassword, "Server Key")

    def __post_init__(self) -> None:
        _check_iterations(self.iterations)
        if not self.salt:
            raise ValueError("SCRAM salt must not be empty")
        for name in ("stored_key", "server_key"):
            if len(getattr(self, name)) != _KEY_BYTES:
                raise ValueError(f"SCRAM {name} must be {_KEY_BYTES} bytes")

    def to_text(self) -> str:
        """PostgreSQL's pg_authid.rolpassword format."""
        return (
            f"{MECHANISM}${self.iterations}:{_b64encode(self.salt)}"
            f"${_b64encode(self.stored_key)}:{_b64encode(self.server_key)}"
        )


def make_verifier(
    password: str | bytes, salt: bytes | None = None, iterations: int = DEFAULT_ITERATIONS
) -> ScramVerifier:
    """A verifier for `password`, as PostgreSQL computes one (random 16-byte salt by default)."""
    if salt is None:
        salt = secrets.token_bytes(SALT_BYTES)
    _check_iterations(iterations)
    if not salt:
        raise ValueError("SCRAM salt must not be empty")
    client_key, server_key = _derive_keys(normalize_password(password), bytes(salt), iterations)
    return ScramVerifier(iterations, bytes(salt), hashlib.sha256(client_key).digest(), server_key)


def parse_verifier(text: str) -> ScramVerifier:
    """Parse "SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>" (pg_authid.rolpassword)."""
    expected = f"expected {MECHANISM}$<iterations>:<base64 salt>$<base64 StoredKey>:<base64 ServerKey>"
    parts = text.split("$")
    if len(parts) != 3 or parts[0] != MECHANISM:
        raise ValueError(f"not a SCRAM-SHA-256 verifier: {expected}")
    iterations_text, colon1, salt_text = parts[1].partition(":")
    stored_text, colon2, server_text = parts[2].partition(":")
    if not (colon1 and colon2):
        raise ValueError(f"malformed SCRAM-SHA-256 verifier: {expected}")
    if not _POSITIVE_NUMBER.fullmatch(iterations_text) or int(iterations_text) > MAX_ITERATIONS:
        raise ValueError(
            f"malformed SCRAM-SHA-256 verifier: iteration count {iterations_text!r} is not 1 to {MAX_ITERATIONS}"
        )
    decoded = {}
    for name, value in (("salt", salt_text), ("StoredKey", stored_text), ("ServerKey", server_text)):
        if not value or not _BASE64.fullmatch(value):
            raise ValueError(f"malformed SCRAM-SHA-256 verifier: {name} is not base64")
        decoded[name] = base64.b64decode(value)
    for name in ("StoredKey", "ServerKey"):
        if len(decoded[name]) != _KEY_BYTES:
            raise ValueError(f"malformed SCRAM-SHA-256 verifier: {name} is not {_KEY_BYTES} bytes")
    return ScramVerifier(int(iterations_text), decoded["salt"], decoded["StoredKey"], decoded["ServerKey"])


# --- message parsing (RFC 5802 §7) ------------------------------------------------------------


def _decode(message: bytes, what: str) -> str:
    try:
        return bytes(message).decode("utf-8")
    except UnicodeDecodeError:
        raise ScramError(f"malformed SCRAM {what}: not valid UTF-8") from None


def _attributes(text: str, what: str) -> list[tuple[str, str]]:
    """Split `a=value,b=value`: RFC 5802 §7 attr-val = ALPHA "=" value; values never hold ","."""
    attributes = []
    for part in text.split(","):
        if len(part) < 2 or part[1] != "=" or not ("a" <= part[0] <= "z" or "A" <= part[0] <= "Z"):
            raise ScramError(f"malformed SCRAM {what}: {part[:20]!r} is not an attribute=value pair")
        attributes.append((part[0], part[2:]))
    return attributes


def _expect(attributes: list[tuple[str, str]], index: int, name: str, what: str) -> str:
    if index >= len(attributes) or attributes[index][0] != name:
        raise ScramError(f"malformed SCRAM {what}: expected attribute {name}= at position {index + 1}")
    return attributes[index][1]


def _reject_mandatory_extension(attributes: list[tuple[str, str]], what: str) -> None:
    # RFC 5802 §5.1: "m" announces a mandatory extension; one we do not know must fail the exchange.
    if attributes[0][0] == "m":
        raise ScramError(f"{what} requires an unsupported SCRAM extension", FEATURE_NOT_SUPPORTED)


def _nonce(value: str, what: str) -> str:
    if not _PRINTABLE.fullmatch(value):
        raise ScramError(f"malformed SCRAM {what}: nonce is empty or not printable ASCII")
    return value


def _b64decode(value: str, name: str, what: str) -> bytes:
    if not _BASE64.fullmatch(value):
        raise ScramError(f"malformed SCRAM {what}: {name} is not valid base64")
    return base64.b64decode(value)


def _new_nonce() -> str:
    return _b64encode(secrets.token_bytes(NONCE_BYTES))


def _escape_saslname(name: str) -> str:
    # RFC 5802 §5.1: "," and "=" in a user name are sent as "=2C" and "=3D".
    return name.replace("=", "=3D").replace(",", "=2C")


class _State(enum.Enum):
    START = "not started"
    FIRST_DONE = "waiting for the final message"
    FINAL_DONE = "waiting for the server's signature"
    DONE = "finished"
    FAILED = "failed"


class ScramClient:
    """The client side of SCRAM-SHA-256: pgherd authenticating to PostgreSQL (AuthenticationSASL).

    Call client_first(), then client_final(server_first), then verify_server_final(server_final).
    PostgreSQL ignores the user name in client-first-message (it uses the startup packet's user);
    libpq sends an empty one.
    """

    def __init__(self, user: str, password: str | bytes, nonce: str | None = None) -> None:
        if nonce is not None and not _PRINTABLE.fullmatch(nonce):
            raise ValueError("SCRAM nonce must be non-empty printable ASCII without ','")
        try:
            user.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("SCRAM user name is not valid Unicode text") from None
        self._password = normalize_password(password)
        self._nonce = nonce if nonce is not None else _new_nonce()
        self._first_bare = f"n={_escape_saslname(user)},r={self._nonce}"
        self._server_signature = b""
        self._state = _State.START

    def _step(self, expected: _State, step: str) -> None:
        if self._state is not expected:
            raise ScramError(f"SCRAM client: {step} called out of order (exchange {self._state.value})")

    def client_first(self) -> bytes:
        """client-first-message: the data of SASLInitialResponse."""
        self._step(_State.START, "client_first")
        self._state = _State.FIRST_DONE
        return f"{_GS2_NO_CHANNEL_BINDING}{self._first_bare}".encode("utf-8")

    def client_final(self, server_first: bytes) -> bytes:
        """client-final-message (SASLResponse) for the server-first-message (AuthenticationSASLContinue).

        This runs PBKDF2 with the server's iteration count (milliseconds at 4096, then cached per
        password, salt and count); it is CPU work that blocks the caller.
        """
        self._step(_State.FIRST_DONE, "client_final")
        self._state = _State.FAILED
        what = "server-first-message"
        text = _decode(server_first, what)
        attributes = _attributes(text, what)
        _reject_mandatory_extension(attributes, what)
        # RFC 5802 §7: server-first-message = nonce "," salt "," iteration-count ["," extensions]
        nonce = _nonce(_expect(attributes, 0, "r", what), what)
        salt = _b64decode(_expect(attributes, 1, "s", what), "salt", what)
        iterations_text = _expect(attributes, 2, "i", what)
        # RFC 5802 §5.1: the server's nonce starts with ours and appends its own part.
        if len(nonce) <= len(self._nonce) or not nonce.startswith(self._nonce):
            raise ScramError("SCRAM server-first-message: server nonce does not extend the client nonce")
        if not salt:
            raise ScramError("malformed SCRAM server-first-message: empty salt")
        if not _POSITIVE_NUMBER.fullmatch(iterations_text) or int(iterations_text) > MAX_ITERATIONS:
            raise ScramError(f"malformed SCRAM {what}: invalid iteration count {iterations_text[:20]!r}")
        client_key, server_key = _derive_keys(self._password, salt, int(iterations_text))
        # RFC 5802 §7: channel-binding = "c=" base64(gs2-header), here without cbind-data.
        without_proof = f"c={_b64encode(_GS2_NO_CHANNEL_BINDING.encode())},r={nonce}"
        # RFC 5802 §3: AuthMessage, ClientSignature, ClientProof, ServerSignature.
        auth_message = f"{self._first_bare},{text},{without_proof}".encode("utf-8")
        client_signature = _hmac(hashlib.sha256(client_key).digest(), auth_message)
        proof = _xor(client_key, client_signature)
        self._server_signature = _hmac(server_key, auth_message)
        self._state = _State.FINAL_DONE
        return f"{without_proof},p={_b64encode(proof)}".encode("ascii")

    def verify_server_final(self, server_final: bytes) -> None:
        """Check the server-final-message (AuthenticationSASLFinal): the server must know the password."""
        self._step(_State.FINAL_DONE, "verify_server_final")
        self._state = _State.FAILED
        what = "server-final-message"
        attributes = _attributes(_decode(server_final, what), what)
        # RFC 5802 §7: server-final-message = (server-error / verifier) ["," extensions]
        name, value = attributes[0]
        if name == "e":
            raise ScramError(f"server rejected SCRAM authentication: {value[:100]}", INVALID_PASSWORD)
        signature = _b64decode(_expect(attributes, 0, "v", what), "server signature", what)
        if not hmac.compare_digest(signature, self._server_signature):
            raise ScramError("SCRAM server signature does not match: the server does not know the password")
        self._state = _State.DONE


class ScramServer:
    """The server side of SCRAM-SHA-256: a client authenticating to pgherd.

    Call server_first(client_first), then server_final(client_final); `authenticated` turns true
    only after a valid proof. Any ScramError ends the exchange.
    """

    def __init__(self, verifier: ScramVerifier, nonce: str | None = None) -> None:
        if nonce is not None and not _PRINTABLE.fullmatch(nonce):
            raise ValueError("SCRAM nonce must be non-empty printable ASCII without ','")
        self._verifier = verifier
        self._server_nonce = nonce if nonce is not None else _new_nonce()
        self._gs2_header = ""
        self._first_bare = ""
        self._server_first = ""
        self._nonce = ""
        self._state = _State.START

    @classmethod
    def from_password(cls, password: str | bytes, nonce: str | None = None) -> ScramServer:
        """A server for a plaintext password (users.toml), reusing one cached verifier per password."""
        # PBKDF2 costs milliseconds per login; one random salt per password per process is as
        # good as PostgreSQL's one salt per role, and lets repeated logins skip PBKDF2.
        key = bytes(password) if isinstance(password, (bytearray, memoryview)) else password
        verifier = _VERIFIER_CACHE.get(key)
        if verifier is None:
            verifier = make_verifier(key)
            if len(_VERIFIER_CACHE) >= VERIFIER_CACHE_SIZE:
                del _VERIFIER_CACHE[next(iter(_VERIFIER_CACHE))]  # drop the oldest
            _VERIFIER_CACHE[key] = verifier
        return cls(verifier, nonce)

    @property
    def authenticated(self) -> bool:
        return self._state is _State.DONE

    def _step(self, expected: _State, step: str) -> None:
        if self._state is not expected:
            raise ScramError(f"SCRAM server: {step} called out of order (exchange {self._state.value})")

    def server_first(self, client_first: bytes) -> bytes:
        """server-first-message (AuthenticationSASLContinue) for client-first-message (SASLInitialResponse)."""
        self._step(_State.START, "server_first")
        self._state = _State.FAILED
        what = "client-first-message"
        text = _decode(client_first, what)
        # RFC 5802 §7: gs2-header = gs2-cbind-flag "," [authzid] ","
        flag, comma1, rest = text.partition(",")
        authzid, comma2, bare = rest.partition(",")
        if not (comma1 and comma2):
            raise ScramError(f"malformed SCRAM {what}: missing gs2 header")
        if flag.startswith("p="):
            raise ScramError(
                "SCRAM channel binding is not supported by pgherd; "
                "connect with channel_binding=prefer or channel_binding=disable",
                FEATURE_NOT_SUPPORTED,
            )
        # "n": the client does not support channel binding; "y": it does but thinks we do not,
        # which is true (RFC 5802 §6), so both are fine.
        if flag not in ("n", "y"):
            raise ScramError(f"malformed SCRAM {what}: unknown channel binding flag {flag[:20]!r}")
        if authzid:
            if authzid.startswith("a="):
                raise ScramError("SCRAM authorization identity (a=) is not supported", FEATURE_NOT_SUPPORTED)
            raise ScramError(f"malformed SCRAM {what}: invalid authzid")
        attributes = _attributes(bare, what)
        _reject_mandatory_extension(attributes, what)
        # RFC 5802 §7: client-first-message-bare = username "," nonce ["," extensions]; PostgreSQL
        # takes the user from the startup packet and ignores n= (libpq sends it empty).
        _expect(attributes, 0, "n", what)
        client_nonce = _nonce(_expect(attributes, 1, "r", what), what)
        self._gs2_header = f"{flag},,"
        self._first_bare = bare
        self._nonce = client_nonce + self._server_nonce
        v = self._verifier
        self._server_first = f"r={self._nonce},s={_b64encode(v.salt)},i={v.iterations}"
        self._state = _State.FIRST_DONE
        return self._server_first.encode("ascii")

    def server_final(self, client_final: bytes) -> bytes:
        """server-final-message "v=..." (AuthenticationSASLFinal) after checking the client's proof."""
        self._step(_State.FIRST_DONE, "server_final")
        self._state = _State.FAILED
        what = "client-final-message"
        text = _decode(client_final, what)
        attributes = _attributes(text, what)
        # RFC 5802 §7: client-final-message = channel-binding "," nonce ["," extensions] "," proof
        if len(attributes) < 3 or attributes[-1][0] != "p" or any(name == "p" for name, _ in attributes[:-1]):
            raise ScramError(f"malformed SCRAM {what}: expected c=, r=, extensions, then the proof p=")
        channel_binding = _b64decode(_expect(attributes, 0, "c", what), "channel binding", what)
        nonce = _expect(attributes, 1, "r", what)
        proof = _b64decode(attributes[-1][1], "proof", what)
        # RFC 5802 §6: c= carries the gs2 header the client sent (no cbind-data without binding).
        if channel_binding != self._gs2_header.encode("ascii"):
            raise ScramError("SCRAM channel binding check failed: c= does not match the gs2 header")
        if not hmac.compare_digest(nonce.encode("utf-8"), self._nonce.encode("ascii")):
            raise ScramError("SCRAM nonce mismatch in client-final-message")
        if len(proof) != _KEY_BYTES:
            raise ScramError(f"malformed SCRAM {what}: proof is not {_KEY_BYTES} bytes")
        without_proof = text.rpartition(",")[0]
        # RFC 5802 §3: ClientKey := ClientProof XOR HMAC(StoredKey, AuthMessage); H(ClientKey)
        # must be StoredKey.
        auth_message = f"{self._first_bare},{self._server_first},{without_proof}".encode("utf-8")
        v = self._verifier
        client_key = _xor(proof, _hmac(v.stored_key, auth_message))
        if not hmac.compare_digest(hashlib.sha256(client_key).digest(), v.stored_key):
            raise ScramError("password authentication failed", INVALID_PASSWORD)
        self._state = _State.DONE
        return f"v={_b64encode(_hmac(v.server_key, auth_message))}".encode("ascii")


_VERIFIER_CACHE: dict[str | bytes, ScramVerifier] = {}
