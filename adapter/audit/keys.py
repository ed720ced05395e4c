"""The audit key (HOMEWARD_AUDIT_HMAC_KEY or ..._FILE) and the purpose-bound keys derived from it.

One secret, two uses that must not be confusable: signing the audit head, and turning an NHS
number into a lookup key that cannot be reversed without the secret.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from pathlib import Path

from adapter.errors import ConfigError


@dataclass(frozen=True, slots=True)
class AuditKeys:
    checkpoint: bytes
    patient: bytes

    @classmethod
    def from_secret(cls, secret: bytes) -> AuditKeys:
        return cls(
            checkpoint=hmac.new(secret, b"homeward audit head v1", hashlib.sha256).digest(),
            patient=hmac.new(secret, b"homeward nhs number v1", hashlib.sha256).digest(),
        )

    def patient_key(self, nhs_number: str) -> str:
        """The stored stand-in for an NHS number (spaces and dashes ignored)."""
        digits = "".join(ch for ch in nhs_number if ch.isalnum())
        return hmac.new(self.patient, digits.encode(), hashlib.sha256).hexdigest()


def load_keys(secret: str, secret_file: Path | None) -> AuditKeys | None:
    """The keys from the setting's value or file; None when neither is set."""
    if secret_file is not None:
        try:
            raw = Path(secret_file).read_bytes().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read audit.hmac_key_file {secret_file}: {exc.strerror}") from exc
    else:
        raw = secret.strip().encode()
    if not raw:
        return None
    if len(raw) < 16:
        raise ConfigError("the audit HMAC key must be at least 16 bytes")
    return AuditKeys.from_secret(raw)
