"""Settings: TOML + HOMEWARD_* overrides, validated once, errors that name the key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from adapter.config import AuthSettings, Settings, TargetSettings
from adapter.errors import ConfigError
from tests.conftest import ROOT


class TestSettings:
    def test_defaults_need_nothing(self) -> None:
        """With no file and no variables, the embedded defaults load (directory drop, SQLite)."""
        settings = Settings.load(None, environ={})
        assert settings.fhir.base_url == ""
        assert settings.store.path == Path("var/homeward.sqlite3")
        assert settings.mapping.dir.is_dir()

    def test_env_overrides_toml(self, tmp_path: Path) -> None:
        """HOMEWARD_* variables win over the TOML file, including the short aliases."""
        toml = tmp_path / "h.toml"
        toml.write_text('[mllp]\nport = 2600\n[fhir]\nbase_url = "http://file"\n')
        env = {
            "HOMEWARD_MLLP_PORT": "0",
            "HOMEWARD_MLLP_HOST": "0.0.0.0",
            "HOMEWARD_STORE": "/tmp/x.db",
            "HOMEWARD_OUTBOX_DIR": "/tmp/drop",
            "HOMEWARD_LOG_FORMAT": "console",
        }
        settings = Settings.load(toml, environ=env)
        assert (settings.mllp.host, settings.mllp.port) == ("0.0.0.0", 0)
        assert settings.fhir.base_url == "http://file"
        assert settings.store.path == Path("/tmp/x.db")
        assert settings.outbox.dir == Path("/tmp/drop")
        assert settings.log.format == "console"

    def test_bad_env_value_names_key_and_variable(self) -> None:
        """A bad value is reported with its dotted key and the variable it came from."""
        with pytest.raises(ConfigError, match=r"mllp\.port \(from HOMEWARD_MLLP_PORT\)"):
            Settings.load(None, environ={"HOMEWARD_MLLP_PORT": "not-a-port"})

    def test_time_zone_defaults_to_london_and_a_bad_one_is_refused(self) -> None:
        """mapping.timezone is Europe/London unless set; a name that is not an IANA zone stops start-up naming the key."""
        assert Settings.load(None, environ={}).mapping.timezone == "Europe/London"
        assert Settings.load(None, environ={"HOMEWARD_MAPPING_TIMEZONE": "UTC"}).mapping.timezone == "UTC"
        with pytest.raises(ConfigError, match=r"mapping\.timezone \(from HOMEWARD_MAPPING_TIMEZONE\).*Europe/Londn"):
            Settings.load(None, environ={"HOMEWARD_MAPPING_TIMEZONE": "Europe/Londn"})

    def test_unknown_key_in_toml_is_refused(self, tmp_path: Path) -> None:
        """A misspelt key in the TOML file stops start-up, naming the key and the file."""
        toml = tmp_path / "h.toml"
        toml.write_text("[mllp]\nprot = 1\n")
        with pytest.raises(ConfigError, match=r"mllp\.prot .*h\.toml"):
            Settings.load(toml, environ={})

    @pytest.mark.parametrize(
        ("toml", "named"),
        [
            ('[audit]\nhmac_key = "sekrit-audit-key-0123456789"\n', "audit.hmac_key"),
            (
                '[[targets]]\nname = "b"\nbase_url = "https://b"\nheaders = { authorization = "Bearer sekrit" }\n',
                "targets[0].headers.Authorization",
            ),
            (
                '[[targets]]\nname = "b"\nbase_url = "https://b"\nheaders = { "x-api-key" = "sekrit-key" }\n',
                "targets[0].headers.X-Api-Key",
            ),
            ('[store]\nurl = "postgresql://homeward:sekrit@db:5432/hw"\n', "store.url"),
            ('[store]\nurl = "postgresql://homeward@db/hw?sslmode=require&password=sekrit"\n', "store.url"),
            ('[fhir]\nbase_url = "https://svc:sekrit@council.example/fhir"\n', "fhir.base_url"),
            ('[[targets]]\nname = "b"\nbase_url = "https://u:sekrit@b.example/fhir"\n', "targets[0].base_url"),
            ('[audit]\nfhir_url = "https://u:sekrit@arr.example/fhir"\n', "audit.fhir_url"),
            (
                '[[targets]]\nname = "b"\nbase_url = "https://b"\n'
                'auth = { kind = "oauth2", token_url = "https://t", client_id = "c", client_secret = "sekrit" }\n',
                "targets.0.auth.client_secret",
            ),
        ],
    )
    def test_secret_written_in_toml_is_refused(self, tmp_path: Path, toml: str, named: str) -> None:
        """A secret written in the TOML file stops start-up, naming the key and where to put it, not the value."""
        path = tmp_path / "h.toml"
        path.write_text(toml)
        with pytest.raises(ConfigError, match=re.escape(named)) as refused:
            Settings.load(path, environ={})
        assert "sekrit" not in str(refused.value)
        # The same key from the environment or a file is the supported way.
        if named == "audit.hmac_key":
            env = {"HOMEWARD_AUDIT_HMAC_KEY": "sekrit-audit-key-0123456789"}
            assert Settings.load(None, environ=env).audit.hmac_key.get_secret_value().startswith("sekrit")
        if named == "store.url":
            env = {"HOMEWARD_STORE_URL": "postgresql://homeward:sekrit@db:5432/hw"}
            assert Settings.load(None, environ=env).store.url.endswith("@db:5432/hw")

    def test_urls_without_a_password_are_fine(self, tmp_path: Path) -> None:
        """A user name, a port, a query without password=, or a plain X-Request-Source header pass."""
        path = tmp_path / "h.toml"
        path.write_text(
            '[store]\nurl = "postgresql://homeward@db:5432/hw?sslmode=require"\n'
            '[[targets]]\nname = "b"\nbase_url = "https://b.example:8443/fhir?_format=json"\n'
            'headers = { "X-Request-Source" = "homeward" }\n'
        )
        settings = Settings.load(path, environ={})
        assert settings.store.url.startswith("postgresql://homeward@") and settings.targets[0].headers

    def test_example_file_loads_and_documents_every_key(self) -> None:
        """examples/homeward.toml loads, and every settings key appears in it."""
        example = ROOT / "examples" / "homeward.toml"
        Settings.load(example, environ={})
        text = example.read_text()
        for section, model in Settings.model_fields.items():
            annotation = model.annotation
            if section == "targets":  # a list of tables, documented as a commented-out example
                assert "# [[targets]]" in text
                annotation = TargetSettings
            else:
                assert f"[{section}]" in text
            for key in annotation.model_fields:  # type: ignore[union-attr]
                assert f"{key} =" in text or f"# {key} =" in text, f"{section}.{key} undocumented"
        for key in AuthSettings.model_fields:
            assert f"# {key} =" in text, f"targets.auth.{key} undocumented"
