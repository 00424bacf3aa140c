"""The identity stand-in's token signing key (RS256), shared with Dovecot (which validates access
tokens locally with the public key) and the Key Vault stand-in (which checks bearer tokens)."""

from __future__ import annotations

import secrets
import time
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa


class SigningKey:
    def __init__(self) -> None:
        self.private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.kid = "devstack-" + secrets.token_hex(6)  # Dovecot caches keys per kid
        self.public_pem: bytes = self.private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def sign(self, claims: dict[str, Any], *, kid: str | None = None) -> str:
        return jwt.encode(
            claims,
            self.private_key,
            algorithm="RS256",
            headers={"kid": kid or self.kid, "typ": "JWT"},
        )

    def verify(self, token: str, *, audience: str | None = None) -> dict[str, Any]:
        """Decode and check signature, expiry and (optionally) audience; raises jwt errors."""
        return jwt.decode(
            token,
            self.private_key.public_key(),
            algorithms=["RS256"],
            audience=audience,
            options={"verify_aud": audience is not None},
            leeway=0,
        )

    def jwk(self) -> dict[str, Any]:
        numbers = self.private_key.public_key().public_numbers()

        def b64(n: int) -> str:
            import base64

            raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
            return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

        return {
            "kty": "RSA",
            "use": "sig",
            "kid": self.kid,
            "alg": "RS256",
            "n": b64(numbers.n),
            "e": b64(numbers.e),
        }


def now() -> int:
    return int(time.time())
