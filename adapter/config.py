"""The settings tree: read once from TOML, overridden by HOMEWARD_* variables, validated at start-up."""

from __future__ import annotations

import os
import tomllib
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    IPvAnyNetwork,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from adapter.errors import ConfigError


def _default_mappings_dir() -> Path:
    """The mappings shipped beside the package (a source checkout or the installed share dir)."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "mappings", here / "_mappings"):
        if candidate.is_dir():
            return candidate
    return Path("mappings")


DeliveryMode = Literal["transaction", "batch", "conditional", "message"]


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class MllpSettings(_Section):
    host: str = "127.0.0.1"
    # 0 asks the OS for a free port; the bound port is logged as mllp.listening.
    port: int = Field(default=2575, ge=0, le=65535)
    # Large enough for an ADT with long NTE/OBX text, small enough that one sender cannot exhaust memory.
    max_frame_bytes: int = Field(default=1_048_576, ge=1024)
    # Close a connection that sends nothing for this long; hospitals reconnect on demand.
    idle_timeout_seconds: float = Field(default=300.0, gt=0)
    # How long SIGTERM waits for in-flight messages before closing anyway.
    shutdown_grace_seconds: float = Field(default=10.0, ge=0)
    # Bounded work: each connection handles one frame at a time, so memory is at most about
    # max_connections x max_frame_bytes. Connections beyond this are closed with a log line.
    max_connections: int = Field(default=64, ge=1)
    # Intake worker processes (adapter/workers.py). 0: the listener and intake run in the serve process
    # beside the forwarder. N: N processes accept on one shared socket and run the intake (parse, map,
    # store, ACK) while the serve process delivers, so the ACK path gets cores of its own.
    # max_connections then applies per worker.
    workers: int = Field(default=0, ge=0, le=32)
    # With workers: the nice value of the serve process's event loop thread (the forwarder), so that
    # when the cores are busy the ACK path, which a hospital waits on, comes first and delivery takes
    # what is left (the outbox holds the difference). 0: equal shares. Raising it needs no privilege.
    delivery_nice: int = Field(default=10, ge=0, le=19)
    # TLS on the listener: certificate and key (PEM). With tls_client_ca_file, mutual TLS: a client
    # must present a certificate signed by that CA.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None
    # Allow-lists (empty: anyone). A sender outside them gets AR and a log line; the frame is kept.
    # In the environment: comma-separated, e.g. HOMEWARD_MLLP_ALLOW_NETWORKS=10.20.0.0/16,127.0.0.1/32
    allow_networks: list[IPvAnyNetwork] = []
    allow_facilities: list[str] = []

    @field_validator("allow_networks", "allow_facilities", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _tls_pair(self) -> MllpSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file needs tls_cert_file and tls_key_file")
        return self


class StoreSettings(_Section):
    path: Path = Path("var/homeward.sqlite3")
    # FULL survives power loss as well as a process crash; the ACK means "durably stored".
    synchronous: Literal["NORMAL", "FULL"] = "FULL"
    # "postgresql://user@host/db": the shared PostgreSQL store, for several instances on one
    # database (run `homeward migrate` first). Empty: the SQLite file at `path`.
    url: str = Field(default="", pattern=r"^(postgres(ql)?://.*)?$")
    # PostgreSQL connections for intake and bookkeeping (claims being sent hold one more each).
    max_connections: int = Field(default=8, ge=1, le=64)


class FhirSettings(_Section):
    # Empty: deliver to the directory drop (outbox.dir) instead of a FHIR server.
    base_url: str = ""
    connect_timeout_seconds: float = Field(default=5.0, gt=0)
    read_timeout_seconds: float = Field(default=30.0, gt=0)
    # httpx collapses with many requests in flight on one client (PERFORMANCE.md); 4 did well.
    max_in_flight: int = Field(default=4, ge=1, le=64)
    # How bundles are sent (README "Delivery"): transaction | batch | conditional | message.
    mode: DeliveryMode = "transaction"


class DeliverySettings(_Section):
    # Delivery processes: 0 delivers from the serve process; N runs the forwarder in N processes, each
    # taking its own share of the (target, ordering key) queues (adapter/delivery_workers.py).
    workers: int = Field(default=0, ge=0, le=16)


class OutboxSettings(_Section):
    dir: Path = Path("var/outbox")


class RetrySettings(_Section):
    max_attempts: int = Field(default=10, ge=1)
    initial_seconds: float = Field(default=1.0, gt=0)
    max_seconds: float = Field(default=300.0, gt=0)
    # After this long undelivered, a message goes to the dead letters whatever its attempt count.
    max_age_seconds: float = Field(default=86_400.0, gt=0)


class AuthSettings(_Section):
    """Outbound auth for one target. Secrets are named here (a variable or a file), never written here."""

    kind: Literal["none", "oauth2"] = "none"
    token_url: str = ""
    client_id: str = ""
    scope: str = ""
    # client_secret: HTTP Basic with the secret (RFC 6749 2.3.1); private_key_jwt: a signed JWT
    # client assertion (RFC 7523), as SMART backend services require.
    client_auth: Literal["client_secret", "private_key_jwt"] = "client_secret"
    client_secret_env: str = ""
    client_secret_file: Path | None = None
    private_key_env: str = ""
    private_key_file: Path | None = None
    key_id: str = ""
    algorithm: Literal["RS384", "ES384", "RS256", "ES256"] = "RS384"
    # A token is renewed this long before it expires, so no request goes out with a dying one.
    refresh_margin_seconds: float = Field(default=60.0, ge=0)

    @model_validator(mode="after")
    def _complete(self) -> AuthSettings:
        if self.kind == "none":
            return self
        missing = [k for k in ("token_url", "client_id") if not getattr(self, k)]
        if self.client_auth == "client_secret" and not (self.client_secret_env or self.client_secret_file):
            missing.append("client_secret_env or client_secret_file")
        if self.client_auth == "private_key_jwt" and not (self.private_key_env or self.private_key_file):
            missing.append("private_key_env or private_key_file")
        if missing:
            raise ValueError(f"oauth2 needs {', '.join(missing)}")
        return self


class TargetSettings(_Section):
    """One delivery target ([[targets]]); site.yaml routes name these."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    kind: Literal["fhir", "directory"] = "fhir"
    mode: DeliveryMode = "transaction"
    base_url: str = ""
    dir: Path | None = None
    connect_timeout_seconds: float = Field(default=5.0, gt=0)
    read_timeout_seconds: float = Field(default=30.0, gt=0)
    max_in_flight: int = Field(default=4, ge=1, le=64)
    # Extra request headers: `headers` for plain values, `headers_env` maps a header to the
    # environment variable holding its value (API keys).
    headers: dict[str, str] = {}
    headers_env: dict[str, str] = {}
    # mutual TLS towards the server, and the CA that signed it (default: the system's).
    client_cert_file: Path | None = None
    client_key_file: Path | None = None
    ca_file: Path | None = None
    # This target's own retry policy; default: the [retry] section.
    retry: RetrySettings | None = None
    auth: AuthSettings = AuthSettings()

    @model_validator(mode="after")
    def _complete(self) -> TargetSettings:
        if self.kind == "fhir" and not self.base_url:
            raise ValueError(f"target '{self.name}': a fhir target needs base_url")
        if self.kind == "directory" and self.dir is None:
            raise ValueError(f"target '{self.name}': a directory target needs dir")
        if (self.client_cert_file is None) != (self.client_key_file is None):
            raise ValueError(f"target '{self.name}': client_cert_file and client_key_file go together")
        return self


class LogSettings(_Section):
    # auto: JSON unless stderr is a terminal.
    format: Literal["auto", "json", "console"] = "auto"
    level: Literal["debug", "info", "warning", "error"] = "info"


class MappingSettings(_Section):
    dir: Path = Field(default_factory=_default_mappings_dir)
    # The feed's local time zone, used when a v2 timestamp has no offset.
    timezone: str = "Europe/London"
    # "full": every bundle is also validated whole by fhir.resources R4B before it is stored (about
    # 1 ms a message). "datatypes": only the per-value checks the engine always makes (every value
    # from the feed against its FHIR datatype); the tests prove on every golden case and on generated
    # messages that such bundles pass full validation. See README "Design notes".
    validation: Literal["full", "datatypes"] = "datatypes"

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        # Checked here so a misspelt zone stops start-up naming the key, not the first message with a traceback.
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"'{value}' is not an IANA time zone name (e.g. Europe/London)") from exc
        return value


class Hl7Settings(_Section):
    # Also validate the message structure with hl7apy (slower; see README design notes).
    strict: bool = False
    # Used when MSH-18 is empty and the bytes are not valid UTF-8.
    fallback_charset: str = "cp1252"


class AuditSettings(_Section):
    # Signs the audit head and keys NHS-number lookups; empty: neither (see README "Audit trail").
    hmac_key: SecretStr = SecretStr("")
    hmac_key_file: Path | None = None
    # Original bodies (the HL7 message, the bundle, the server's reply) of messages older than this
    # are purged by serve once an hour and by `homeward audit purge`; 0 keeps them for ever.
    # Audit records, sizes and hashes always stay, and the chain still verifies.
    body_retention_days: float = Field(default=0, ge=0)
    # A FHIR server (base URL, or its .../AuditEvent endpoint) that receives one AuditEvent per
    # delivery attempt (IHE BALP shape); empty: none. Best effort; the store's trail is the record.
    fhir_url: str = ""


class AdminSettings(_Section):
    # /metrics, /healthz, /readyz over HTTP. Loopback by default; no port set: no admin port at all.
    host: str = "127.0.0.1"
    port: int | None = Field(default=None, ge=0, le=65535)


class Settings(_Section):
    mllp: MllpSettings = MllpSettings()
    store: StoreSettings = StoreSettings()
    fhir: FhirSettings = FhirSettings()
    delivery: DeliverySettings = DeliverySettings()
    outbox: OutboxSettings = OutboxSettings()
    retry: RetrySettings = RetrySettings()
    log: LogSettings = LogSettings()
    mapping: MappingSettings = MappingSettings()
    hl7: Hl7Settings = Hl7Settings()
    audit: AuditSettings = AuditSettings()
    admin: AdminSettings = AdminSettings()
    # More delivery targets, each with its own mode, retry policy and auth (README "Delivery").
    targets: list[TargetSettings] = []

    @model_validator(mode="after")
    def _unique_targets(self) -> Settings:
        names = [t.name for t in self.targets]
        if len(names) != len(set(names)):
            raise ValueError("[[targets]] names must be unique")
        return self

    @classmethod
    def load(cls, path: Path | None = None, environ: Mapping[str, str] | None = None) -> Settings:
        """Read `path` (TOML, optional), apply HOMEWARD_* overrides, validate.

        Raises ConfigError naming the key (and the variable it came from) on any problem.
        """
        environ = os.environ if environ is None else environ
        data: dict[str, Any] = {}
        if path is not None:
            try:
                data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
            except OSError as exc:
                raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"{path}: invalid TOML: {exc}") from exc
            _refuse_secrets(data, path)
        sources = _apply_environment(data, environ)
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(_describe(exc, sources, path)) from exc


# Request headers that carry credentials by convention (API gateways included): only from headers_env.
SECRET_HEADERS = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "cookie",
        "x-api-key",
        "api-key",
        "apikey",
        "x-auth-token",
        "ocp-apim-subscription-key",
    }
)


def _refuse_secrets(data: dict[str, Any], path: Path) -> None:
    """Secrets come from variables or files: a TOML file lives in version control. The value is never echoed."""
    audit = data.get("audit")
    if isinstance(audit, dict) and "hmac_key" in audit:
        raise ConfigError(
            f"audit.hmac_key (in {path}): a secret may not be written in the settings file;"
            " set HOMEWARD_AUDIT_HMAC_KEY or audit.hmac_key_file"
        )
    targets = data.get("targets")
    for n, target in enumerate(targets if isinstance(targets, list) else []):
        headers = target.get("headers") if isinstance(target, dict) else None
        for name in headers if isinstance(headers, dict) else {}:
            if str(name).lower() in SECRET_HEADERS:
                canonical = "-".join(part.capitalize() for part in str(name).split("-"))
                raise ConfigError(
                    f"targets[{n}].headers.{canonical} (in {path}): a secret may not be written in the settings"
                    " file; name a variable in headers_env, or use auth"
                )
    for key, value in _strings(data):
        if _url_has_password(value):
            raise ConfigError(
                f"{key} (in {path}): a password may not be written in the settings file; leave it out of the URL"
                " and set the whole URL in the environment (HOMEWARD_STORE_URL, ...), or for PostgreSQL use"
                " PGPASSWORD / a .pgpass file"
            )


def _strings(node: Any, key: str = "") -> list[tuple[str, str]]:
    """Every string in the TOML data with its dotted key (targets[0].base_url)."""
    if isinstance(node, str):
        return [(key, node)]
    if isinstance(node, dict):
        return [found for k, v in node.items() for found in _strings(v, f"{key}.{k}" if key else str(k))]
    if isinstance(node, list):
        return [found for n, v in enumerate(node) for found in _strings(v, f"{key}[{n}]")]
    return []


def _url_has_password(value: str) -> bool:
    """user:password@ in a URL, or a password= query parameter (libpq accepts both)."""
    if "://" not in value:
        return False
    try:
        parts = urllib.parse.urlsplit(value.strip())
        has_password = parts.password is not None
    except ValueError:  # not a URL after all (a bad port, ...): validation reports it without the value
        return False
    return has_password or "password" in {k.lower() for k, _ in urllib.parse.parse_qsl(parts.query)}


# Short names the issue tracker and deployment guides use, beside the regular HOMEWARD_<SECTION>_<KEY>.
ENV_ALIASES: dict[str, tuple[str, str]] = {
    "HOMEWARD_STORE": ("store", "path"),
    "HOMEWARD_OUTBOX_DIR": ("outbox", "dir"),
    "HOMEWARD_MAPPINGS_DIR": ("mapping", "dir"),
}


def env_names() -> dict[str, tuple[str, str]]:
    """Every environment variable Settings reads, with the (section, key) it sets."""
    names = dict(ENV_ALIASES)
    for section, field in Settings.model_fields.items():
        model = field.annotation
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            continue  # [[targets]]: TOML only
        for key in model.model_fields:
            names[f"HOMEWARD_{section.upper()}_{key.upper()}"] = (section, key)
    return names


def _apply_environment(data: dict[str, Any], environ: Mapping[str, str]) -> dict[tuple[str, str], str]:
    sources: dict[tuple[str, str], str] = {}
    for name, (section, key) in env_names().items():
        if name in environ:
            table = data.setdefault(section, {})
            if not isinstance(table, dict):
                raise ConfigError(f"[{section}] must be a table")
            table[key] = environ[name]
            sources[(section, key)] = name
    return sources


def _describe(exc: ValidationError, sources: dict[tuple[str, str], str], path: Path | None) -> str:
    lines = []
    for error in exc.errors():
        loc = tuple(str(part) for part in error["loc"])
        key = ".".join(loc)
        origin = sources.get((loc[0], loc[1])) if len(loc) >= 2 else None
        where = f" (from {origin})" if origin else (f" (in {path})" if path else "")
        lines.append(f"{key}{where}: {error['msg']}")
    return "invalid settings: " + "; ".join(lines)
