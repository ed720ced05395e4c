"""The `homeward` command line: map, check-config, send."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import GOLDEN, ROOT


def homeward(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "adapter", *args], cwd=cwd, capture_output=True, text=True, timeout=60)


class TestCli:
    def test_map_prints_bundle(self) -> None:
        """`homeward map` prints a transaction Bundle for a golden A03 and exits 0."""
        result = homeward("map", str(GOLDEN / "ADT_A03" / "basic.hl7"))
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["type"] == "transaction"

    def test_map_explain(self) -> None:
        """`homeward map --explain` prints element <- field lines and the fields no rule read, not the bundle."""
        result = homeward("map", "--explain", str(GOLDEN / "ADT_A16" / "obx_not_used.hl7"))
        assert result.returncode == 0, result.stderr
        assert "Encounter.period.start" in result.stdout and "<- PV1-44" in result.stdout
        assert "not used by any rule: EVN-1, PID-1, PV1-1, OBX (whole segment)" in result.stdout
        assert '"resourceType"' not in result.stdout

    def test_map_failure_is_clear(self, tmp_path: Path) -> None:
        """An A03 without PV1 fails with a non-zero exit and a message naming the missing segment."""
        bad = tmp_path / "bad.hl7"
        text = (GOLDEN / "ADT_A03" / "basic.hl7").read_text()
        bad.write_text("\n".join(line for line in text.splitlines() if not line.startswith("PV1")))
        result = homeward("map", str(bad))
        assert result.returncode == 1
        assert "AE 101 at PV1" in result.stderr
        assert result.stdout == ""

    def test_check_config(self) -> None:
        """`homeward check-config` validates settings and mappings and says so."""
        result = homeward("check-config", "--config", "examples/homeward.toml")
        assert result.returncode == 0, result.stderr
        assert "mappings: ok" in result.stdout

    def test_check_config_names_bad_key(self) -> None:
        """A bad variable makes check-config exit 2 with the key named."""
        result = subprocess.run(
            [sys.executable, "-m", "adapter", "check-config"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            env={"HOMEWARD_MLLP_PORT": "x", "PATH": ""},
            timeout=60,
        )
        assert result.returncode == 2
        assert "HOMEWARD_MLLP_PORT" in result.stderr

    def test_send_prints_acks(self, serve) -> None:  # type: ignore[no-untyped-def]
        """`homeward send` sends a file over MLLP and prints the AA it gets back."""
        process = serve()
        result = homeward("send", "--port", str(process.port), str(GOLDEN / "ADT_A03" / "basic.hl7"))
        assert result.returncode == 0, result.stderr
        assert "MSA|AA|MSG00001" in result.stdout

    def test_serve_refuses_a_route_to_an_unknown_target(self, tmp_path: Path) -> None:
        """A site.yaml route naming a target the settings do not configure stops `homeward serve` at start-up."""
        import shutil

        mappings = tmp_path / "mappings"
        shutil.copytree(ROOT / "mappings", mappings)
        site = mappings / "site.yaml"
        site.write_text(site.read_text().replace("unrouted: {targets: [default]}", "unrouted: {targets: [broker]}"))
        result = subprocess.run(
            [sys.executable, "-m", "adapter", "serve"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "HOMEWARD_MAPPINGS_DIR": str(mappings), "HOMEWARD_MLLP_PORT": "0"},
        )
        assert result.returncode == 2
        assert "site.yaml: routing: target(s) ['broker'] are not configured" in result.stderr
