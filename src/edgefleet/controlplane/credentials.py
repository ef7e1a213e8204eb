"""Secrets: API tokens and device credentials are random 256-bit strings, stored as SHA-256 hashes only.

A plain SHA-256 is the right hash here (a slow password hash would only slow the check-in path; there is nothing
to brute-force). Apart from :mod:`auth` so that the domain modules (devices) can issue credentials without
importing the HTTP layer."""

from __future__ import annotations

import hashlib
import secrets

__all__ = ["hash_secret", "new_secret"]


def new_secret(prefix: str) -> str:
    return f"{prefix}_{secrets.token_urlsafe(32)}"


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()
