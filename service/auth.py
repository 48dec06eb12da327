"""API keys: one credential store, every dialect's own scheme, checked once in a gRPC interceptor.

A credential is a `key` and, optionally, a `secret`. It is all of its parts: where it has a secret, no
scheme lets its key in without that secret. Each dialect declares the schemes its clients use (see each
`service/dialects/*.py`'s `DIALECT.auth`):
- `Authorization: Bearer <key>` (OpenAI, AIGNE Hub, Hugging Face, native gRPC); a credential with a secret
  presents it as `Bearer <key>:<secret>`
- `Authorization: Basic base64(key:secret)` (Inworld)
- a header carrying the key, e.g. HrFlow's `X-API-KEY` (+ `X-USER-EMAIL`); `<key>:<secret>` likewise

Keys and secrets are kept only as SHA-256 digests and compared with `hmac.compare_digest` against every
stored credential, so neither they nor the time a comparison takes tell anything; logs name a credential
by its `name`, never by its key, and no log line carries the keys file's content.

Reloads fail closed: a reload that cannot be read, cannot be parsed, or yields no credential at all keeps
the last good set (and says so in the log and in `embedding_credential_reloads_total`). Going from keys
to an open service takes a restart.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import yaml

from . import errors, metrics

log = logging.getLogger(__name__)
ENV_KEYS = "EMBED_API_KEYS"


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


@dataclass(frozen=True)
class Credential:
    name: str
    key_digest: bytes
    secret_digest: bytes | None  # None: the credential is its key alone

    @property
    def identity(self) -> str:
        """Who this credential is, for partitioning the cache: from its digests, never its name (names may repeat)."""
        return hashlib.sha256(self.key_digest + (self.secret_digest or b"")).hexdigest()[:32]


# A key shorter than this is refused: it is guessable, and a keys file caught half-written must not make a few first
# characters of a key a valid key.
MIN_KEY_CHARS = 16


class KeysFileError(ValueError):
    """The keys file could not be used; the message never quotes its content."""


def _parse_keys_file(text: str, path: str) -> list[Credential]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        # yaml's own message quotes the offending line, which can hold a key: only its position is kept.
        raise KeysFileError(f"{path}: not valid YAML{where}") from None
    if data is None:
        return []
    entries = data.get("keys", []) if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise KeysFileError(f"{path}: expected `keys:` with a list of {{name, key, secret}}")
    creds = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("key"), str) or not entry["key"]:
            raise KeysFileError(f"{path}: keys[{i}] needs a non-empty string `key`")
        if len(entry["key"]) < MIN_KEY_CHARS:
            raise KeysFileError(f"{path}: keys[{i}].key is shorter than {MIN_KEY_CHARS} characters")
        secret = entry.get("secret")
        if secret is not None and (not isinstance(secret, str) or secret == ""):
            # YAML reads `secret: 0123` as the number 83: only a string is what the operator wrote.
            raise KeysFileError(f"{path}: keys[{i}].secret must be a non-empty string when present (quote it)")
        name = entry.get("name")
        creds.append(Credential(str(name) if name else f"key-{i}", _digest(entry["key"]), _digest(str(secret)) if secret is not None else None))
    return creds


def parse_env(value: str) -> list[Credential]:
    creds = []
    for i, item in enumerate(x.strip() for x in value.split(",")):
        if item:
            key, sep, secret = item.partition(":")
            if not key or (sep and not secret):
                raise KeysFileError(f"${ENV_KEYS}: item {i} must be `key` or `key:secret`, both non-empty")
            if len(key) < MIN_KEY_CHARS:
                raise KeysFileError(f"${ENV_KEYS}: item {i}'s key is shorter than {MIN_KEY_CHARS} characters")
            creds.append(Credential(f"env-{i}", _digest(key), _digest(secret) if sep else None))
    return creds


class CredentialStore:
    """Keys from a file and/or the environment; `reload()` swaps them atomically, and never opens the service."""

    def __init__(self, path: str = "", env: dict[str, str] | None = None) -> None:
        self.path = path
        self._env = os.environ if env is None else env
        self._credentials: tuple[Credential, ...] = ()
        self.fingerprint = b""  # digest of what the last good load read (the file watcher compares it)
        creds, self.fingerprint = self._read()
        if self.path and not creds:
            # An operator who points at a keys file expects keys: an empty one must not start an open service.
            raise KeysFileError(f"{self.path}: holds no keys; remove auth.keys_file to run an open service")
        self._credentials = tuple(creds)
        log.info("credentials loaded", extra={"credentials": len(creds), "file": self.path or None})

    @property
    def enabled(self) -> bool:
        return bool(self._credentials)

    def __len__(self) -> int:
        return len(self._credentials)

    def _read(self) -> tuple[list[Credential], bytes]:
        creds: list[Credential] = []
        raw = b""
        if self.path:
            raw = self._read_stable()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise KeysFileError(f"{self.path}: not UTF-8 text") from None
            creds += _parse_keys_file(text, self.path)
        env_value = self._env.get(ENV_KEYS, "")
        creds += parse_env(env_value)
        return creds, hashlib.sha256(raw + b"\0" + env_value.encode()).digest()

    def _read_stable(self) -> bytes:
        """The keys file's bytes, read until two reads 50 ms apart agree: a file caught mid-write (an editor writing
        in place) must not make a prefix of a key valid. Blocking: call it off the event loop."""
        previous = None
        for _ in range(20):
            try:
                raw = Path(self.path).read_bytes()
            except OSError as e:
                raise KeysFileError(f"{self.path}: cannot be read ({e.strerror})") from None
            if raw == previous:
                return raw
            previous = raw
            time.sleep(0.05)
        raise KeysFileError(f"{self.path}: kept changing while it was read")

    def file_fingerprint(self) -> bytes | None:
        """What a reload would read now, as a digest (None if unreadable): lets a watcher skip no-op reloads."""
        try:
            raw = Path(self.path).read_bytes() if self.path else b""
        except OSError:
            return None
        return hashlib.sha256(raw + b"\0" + self._env.get(ENV_KEYS, "").encode()).digest()

    def reload(self) -> bool:
        """Re-reads the keys; True if the new set is in use. Anything but a usable, non-empty set keeps the old one."""
        try:
            creds, fingerprint = self._read()
        except KeysFileError as e:
            metrics.CREDENTIAL_RELOADS.labels("invalid").inc()
            log.error("credentials not reloaded; keeping the previous ones", extra={"error": str(e), "credentials": len(self)})
            return False
        except Exception as e:  # noqa: BLE001 - whatever a hostile file makes the parser raise (a 100,000-deep
            # nesting is a RecursionError, not a YAMLError): the old keys stay, and the message names no content.
            metrics.CREDENTIAL_RELOADS.labels("invalid").inc()
            log.error("credentials not reloaded: the keys file could not be parsed; keeping the previous ones",
                      extra={"error": type(e).__name__, "file": self.path or None, "credentials": len(self)})
            return False
        if not creds and self._credentials:
            metrics.CREDENTIAL_RELOADS.labels("empty").inc()
            log.error(
                "credentials not reloaded: the new set is empty, and going from keys to an open service takes a restart; "
                "keeping the previous ones",
                extra={"credentials": len(self), "file": self.path or None},
            )
            return False
        self._credentials = tuple(creds)
        self.fingerprint = fingerprint
        metrics.CREDENTIAL_RELOADS.labels("ok").inc()
        log.info("credentials reloaded", extra={"credentials": len(creds), "file": self.path or None})
        return True

    def match(self, candidates: list[tuple[str, str | None]]) -> Credential | None:
        """The credential one of the (key, secret) readings of what a caller sent matches; every pair is compared.

        A credential with a secret matches only when the same secret is presented; one without a secret only
        when none (or an empty one) is.
        """
        found = None
        for key, secret in candidates:
            kd = _digest(key)
            sd = _digest(secret) if secret else None
            for cred in self._credentials:
                key_ok = hmac.compare_digest(kd, cred.key_digest)
                if cred.secret_digest is None:
                    secret_ok = sd is None
                else:
                    secret_ok = sd is not None and hmac.compare_digest(sd, cred.secret_digest)
                if key_ok and secret_ok and found is None:
                    found = cred
        return found


# ---------------------------------------------------------------------------------------------------
# Schemes: how a caller presents a credential. Each reads the request's metadata (REST headers arrive
# lowercased through Envoy) and returns the (key, secret) readings of what was sent, or None if the caller
# did not use this scheme.


class Scheme:
    how: str = ""
    # Said for a missing or wrong credential when this is the dialect's first scheme (HrFlow words its own).
    missing_message: str | None = None
    invalid_message: str = "Incorrect API key provided."

    def present(self, metadata: dict[str, str]) -> list[tuple[str, str | None]] | None:
        raise NotImplementedError

    def invalid(self, metadata: dict[str, str]) -> str:
        return self.invalid_message


def _key_and_maybe_secret(value: str) -> list[tuple[str, str | None]]:
    """`key` or `key:secret`: both readings, so a key that itself holds a colon still matches."""
    readings: list[tuple[str, str | None]] = [(value, None)]
    key, sep, secret = value.partition(":")
    if sep and key and secret:
        readings.append((key, secret))
    return readings


class Bearer(Scheme):
    how = "Authorization: Bearer <key> (or <key>:<secret> for a key with a secret)"

    def present(self, metadata):
        scheme, _, value = metadata.get("authorization", "").partition(" ")
        value = value.strip()
        if scheme.lower() != "bearer" or not value:
            return None
        return _key_and_maybe_secret(value)


class Basic(Scheme):
    how = "Authorization: Basic base64(key:secret)"
    invalid_message = "Incorrect API key or secret provided."

    def present(self, metadata):
        scheme, _, value = metadata.get("authorization", "").partition(" ")
        value = value.strip()
        if scheme.lower() != "basic" or not value:
            return None
        try:
            decoded = base64.b64decode(value, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise _unauthenticated("Malformed Basic credentials: expected base64(key:secret).", "invalid_api_key") from None
        key, sep, secret = decoded.partition(":")
        return [(key, secret if sep else None)] if key else [("", None)]


class HeaderKey(Scheme):
    """A header that carries the key (`<key>` or `<key>:<secret>`), with other headers the API also requires."""

    def __init__(self, header: str, requires: tuple[str, ...] = (), how: str = "", missing: str | None = None,
                 invalid: str | None = None, missing_required: str | None = None) -> None:
        self.header = header.lower()
        self.requires = tuple(h.lower() for h in requires)
        self.how = how or f"{header}: <key>"
        self.missing_message = missing
        self._invalid = invalid
        self._missing_required = missing_required

    def present(self, metadata):
        value = metadata.get(self.header, "").strip()
        if not value:
            return None
        for h in self.requires:
            if not metadata.get(h):
                raise _unauthenticated(self._missing_required or f"Missing {h} header.", "missing_required_header")
        return _key_and_maybe_secret(value)

    def invalid(self, metadata):
        # HrFlow quotes the key it refused; quoted here masked, and never its secret: an error body ends up in the
        # caller's logs, and a key sent with a typo in its secret is still a real key.
        return (self._invalid or "Incorrect API key provided.").format(key=masked(metadata.get(self.header, "")))


def masked(sent: str) -> str:
    """What of a refused credential an error may quote: the key's first 4 characters, the rest starred."""
    key = sent.strip().partition(":")[0]
    return (key[:4] if len(key) >= 16 else "") + "****"


BEARER = Bearer()
BASIC = Basic()


def check(store: CredentialStore, schemes: tuple[Scheme, ...], metadata: dict[str, str]) -> Credential | None:
    """The caller's credential (None when the service is open), or a ServiceError(UNAUTHENTICATED) in the dialect's words."""
    if not store.enabled:
        return None
    for scheme in schemes:
        readings = scheme.present(metadata)
        if readings is None:
            continue
        if cred := store.match(readings):
            return cred
        raise _unauthenticated(scheme.invalid(metadata), "invalid_api_key")
    if schemes and schemes[0].missing_message:
        raise _unauthenticated(schemes[0].missing_message, "missing_api_key")
    expected = " or ".join(s.how for s in schemes)
    if metadata.get("authorization") or any(k.endswith("api-key") and v for k, v in metadata.items()):
        raise _unauthenticated(f"Wrong authentication scheme for this API: send {expected}.", "invalid_auth_scheme")
    raise _unauthenticated(f"Missing API key: send {expected}.", "missing_api_key")


def _unauthenticated(message: str, reason: str) -> errors.ServiceError:
    return errors.ServiceError(grpc.StatusCode.UNAUTHENTICATED, message, reason=reason)
