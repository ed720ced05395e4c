"""The whole Homeward exception tree, and the ACK code each inbound failure earns.

```
AdapterError
├── InboundError          .ack_code + .hl7_error_code + .location; intake turns it into an ACK
│   ├── ParseError            AE 100/102   (hl7apy and the lean parser are wrapped in hl7/parse.py)
│   ├── FrameTooLarge         AR 207       (the frame passed mllp.max_frame_bytes)
│   ├── UnsupportedMessage    AR 200/201/203
│   ├── RefusedSender         AR 207       (not on the allow-list)
│   ├── MappingError          AE 101/102/103 (missing required field, bad value, no vocabulary match)
│   └── StoreUnavailable      AE 207       (the sender should resend later)
├── DeliveryError         .retryable; the forwarder looks at nothing else
│   ├── RetryableDelivery     connect/read/pool timeouts, 408, 429, 5xx (keeps Retry-After)
│   └── PermanentDelivery     other 4xx; keeps the OperationOutcome for the audit record
└── ConfigError           start-up only: bad TOML or environment, a mapping file that fails validation
```
"""

from __future__ import annotations

from enum import StrEnum


class AckCode(StrEnum):
    """MSA-1 acknowledgment codes, HL7 v2 chapter 2 original mode (table 0008)."""

    ACCEPT = "AA"
    ERROR = "AE"
    REJECT = "AR"


class AdapterError(Exception):
    """Base of every error Homeward raises on purpose."""


class InboundError(AdapterError):
    """A problem with an inbound message; intake answers it with an ACK, never a dropped socket.

    `location` is an HL7 location such as "PID-3" or "MSH-9" (segment, field), so the ERR
    segment can point at it. `reason` must be safe to log: it names fields, never values.
    """

    ack_code: AckCode = AckCode.ERROR
    hl7_error_code: str = "207"  # table 0357: application internal error

    def __init__(self, reason: str, *, location: str | None = None, hl7_error_code: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.location = location
        if hl7_error_code is not None:
            self.hl7_error_code = hl7_error_code


class ParseError(InboundError):
    """The frame is not a readable HL7 v2 message (no MSH, bad encoding characters, bad charset)."""

    ack_code = AckCode.ERROR
    hl7_error_code = "100"  # segment sequence error


class FrameTooLarge(InboundError):
    """The MLLP frame was larger than the configured maximum; its head is kept, the rest discarded."""

    ack_code = AckCode.REJECT
    hl7_error_code = "207"


class UnsupportedMessage(InboundError):
    """The message type, trigger event or version is not one this site takes."""

    ack_code = AckCode.REJECT
    hl7_error_code = "200"  # unsupported message type


class RefusedSender(InboundError):
    """The peer address or sending facility is not on the allow-list."""

    ack_code = AckCode.REJECT
    hl7_error_code = "207"


class MappingError(InboundError):
    """The message lacks what its event needs, or a value cannot be carried into FHIR."""

    ack_code = AckCode.ERROR
    hl7_error_code = "101"  # required field missing


class StoreUnavailable(InboundError):
    """The durable store could not commit; AE so the hospital resends later."""

    ack_code = AckCode.ERROR
    hl7_error_code = "207"


class DeliveryError(AdapterError):
    """Sending a bundle to a target failed; `retryable` is all the forwarder decides on."""

    retryable: bool = True

    def __init__(
        self,
        reason: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
        outcome: str | None = None,
        diagnostics: str = "",
    ):
        super().__init__(reason)
        self.reason = reason  # logged and audited: never patient data
        # The server's own words (OperationOutcome diagnostics), which may quote the refused resource:
        # kept on the outbox row for people (last_error), never logged or audited.
        self.diagnostics = diagnostics
        self.status = status
        self.retry_after = retry_after
        # The server's OperationOutcome (JSON text), kept for the audit record and the dead letter.
        self.outcome = outcome


class RetryableDelivery(DeliveryError):
    """A failure that may pass: connection errors, timeouts, 408, 429, 5xx."""

    retryable = True


class PermanentDelivery(DeliveryError):
    """A failure that will not pass by itself: other 4xx, a rejected payload."""

    retryable = False


class ConfigError(AdapterError):
    """Settings or mapping files are invalid; raised at start-up only, naming the file and key."""
