"""API keys: one credential store, every dialect's own scheme, checked once in a gRPC interceptor.

Schemes, by dialect (REST headers reach the server as gRPC metadata through Envoy):
- OpenAI, AIGNE Hub, Hugging Face, and native gRPC callers of any service: `Authorization: Bearer <key>`
- Inworld: `Authorization: Basic base64(key:secret)` (Bearer too, for native gRPC callers)
- HrFlow: `X-API-KEY: <key>` with `X-USER-EMAIL`

Keys are kept only as SHA-256 digests and compared with `hmac.compare_digest` against every stored key, so
neither the keys nor the time a comparison takes tell anything; logs name a credential by its `name`.
No keys configured means the service is open (and then listens on loopback only unless told otherwise).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import grpc
import yaml

from . import errors

log = logging.getLogger(__name__)
ENV_KEYS = "EMBED_API_KEYS"

# Dialect → the schemes its callers use.
SCHEMES = {
    "openai": ("bearer",),
    "huggingface": ("bearer",),
    "inworld": ("basic", "bearer"),
    "hrflow": ("x-api-key",),
}
HOW = {
    "bearer": "Authorization: Bearer <key>",
    "basic": "Authorization: Basic base64(key:secret)",
    "x-api-key": "X-API-KEY: <key> and X-USER-EMAIL: <email>",
}


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


@dataclass(frozen=True)
class Credential:
    name: str
    key_digest: bytes
    secret_digest: bytes | None  # for Inworld's key:secret


class CredentialStore:
    """Keys from a file and/or the environment; `reload()` swaps them atomically (SIGHUP)."""

    def __init__(self, path: str = "", env: dict[str, str] | None = None) -> None:
        self.path = path
        self._env = os.environ if env is None else env
        self._credentials: tuple[Credential, ...] = ()
        self.reload()

    @property
    def enabled(self) -> bool:
        return bool(self._credentials)

    def __len__(self) -> int:
        return len(self._credentials)

    def reload(self) -> None:
        creds: list[Credential] = []
        if self.path:
            data = yaml.safe_load(Path(self.path).read_text()) or {}
            entries = data.get("keys", []) if isinstance(data, dict) else None
            if not isinstance(entries, list):
                raise ValueError(f"{self.path}: expected `keys:` with a list of {{name, key, secret}}")
            for i, entry in enumerate(entries):
                if not isinstance(entry, dict) or not isinstance(entry.get("key"), str) or not entry["key"]:
                    raise ValueError(f"{self.path}: keys[{i}] needs a non-empty `key`")
                secret = entry.get("secret")
                creds.append(Credential(str(entry.get("name") or f"key-{i}"), _digest(entry["key"]), _digest(str(secret)) if secret else None))
        for i, item in enumerate(x.strip() for x in self._env.get(ENV_KEYS, "").split(",")):
            if item:
                key, _, secret = item.partition(":")
                creds.append(Credential(f"env-{i}", _digest(key), _digest(secret) if secret else None))
        self._credentials = tuple(creds)
        log.info("credentials loaded", extra={"credentials": len(creds), "file": self.path or None})

    def match(self, key: str, secret: str | None = None) -> Credential | None:
        """The credential for `key` (and `secret`, when one is given); every stored key is compared."""
        kd = _digest(key)
        sd = _digest(secret) if secret is not None else None
        found = None
        for cred in self._credentials:
            ok = hmac.compare_digest(kd, cred.key_digest)
            if sd is not None and cred.secret_digest is not None:
                ok = hmac.compare_digest(sd, cred.secret_digest) and ok
            elif sd is not None and secret:  # a secret was sent but this key has none
                ok = False
            if ok and found is None:
                found = cred
        return found


def check(store: CredentialStore, dialect: str, metadata: dict[str, str], rest: bool) -> Credential | None:
    """The caller's credential, or a ServiceError(UNAUTHENTICATED) in the dialect's words."""
    if not store.enabled:
        return None
    schemes = SCHEMES.get(dialect, ("bearer",))
    if dialect == "inworld" and rest:
        schemes = ("basic",)  # Inworld's REST API takes Basic; Bearer is for native gRPC callers
    authorization = metadata.get("authorization", "")
    scheme, _, value = authorization.partition(" ")
    scheme, value = scheme.lower(), value.strip()
    if "x-api-key" in schemes:
        key = metadata.get("x-api-key", "")
        if key and metadata.get("x-user-email") and (cred := store.match(key)):
            return cred
        if not key:
            raise _unauthenticated(dialect, "Unauthorized. Missing secret key: send X-API-KEY and X-USER-EMAIL.", "missing_api_key")
        if not metadata.get("x-user-email"):
            raise _unauthenticated(dialect, "Unauthorized. Missing user email: send X-USER-EMAIL.", "missing_user_email")
        raise _unauthenticated(dialect, f"Unauthorized. Invalid secret key: {key}", "invalid_api_key")
    if scheme == "bearer" and "bearer" in schemes and value:
        if cred := store.match(value):
            return cred
        raise _unauthenticated(dialect, "Incorrect API key provided.", "invalid_api_key")
    if scheme == "basic" and "basic" in schemes and value:
        try:
            decoded = base64.b64decode(value, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise _unauthenticated(dialect, "Malformed Basic credentials: expected base64(key:secret).", "invalid_api_key") from None
        key, sep, secret = decoded.partition(":")
        if cred := store.match(key, secret if sep else None):
            return cred
        raise _unauthenticated(dialect, "Incorrect API key or secret provided.", "invalid_api_key")
    expected = " or ".join(HOW[s] for s in schemes)
    if authorization or metadata.get("x-api-key"):
        raise _unauthenticated(dialect, f"Wrong authentication scheme for this API: send {expected}.", "invalid_auth_scheme")
    raise _unauthenticated(dialect, f"Missing API key: send {expected}.", "missing_api_key")


def _unauthenticated(dialect: str, message: str, reason: str) -> errors.ServiceError:
    return errors.ServiceError(grpc.StatusCode.UNAUTHENTICATED, message, reason=reason)
