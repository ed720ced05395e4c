"""Routing through `homeward serve`: each council's discharges reach that council's target; no route is kept, not sent."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import yaml

from adapter.mllp.client import MllpClient
from tests.conftest import MAPPINGS, ack_fields, golden_message


def two_council_site(tmp_path: Path) -> Path:
    """mappings/ with Milton Keynes -> target mk, Bedford -> target bedford, and unrouted messages held."""
    root = tmp_path / "mappings"
    shutil.copytree(MAPPINGS, root)
    site = yaml.safe_load((root / "site.yaml").read_text())
    site["routing"]["routes"][0]["targets"] = ["mk"]
    site["routing"]["routes"][1]["targets"] = ["bedford"]
    site["routing"]["unrouted"] = {}
    (root / "site.yaml").write_text(yaml.safe_dump(site))
    return root


def test_two_councils_and_an_unrouted_message(tmp_path: Path, serve) -> None:  # type: ignore[no-untyped-def]
    """MK9 goes only to target mk, MK40 only to target bedford; a Luton postcode gets AA and goes nowhere."""
    config = tmp_path / "homeward.toml"
    config.write_text(
        f"""
[[targets]]
name = "mk"
kind = "directory"
dir = "{tmp_path / "out-mk"}"

[[targets]]
name = "bedford"
kind = "directory"
dir = "{tmp_path / "out-bedford"}"
"""
    )
    process = serve("--config", str(config), HOMEWARD_MAPPINGS_DIR=str(two_council_site(tmp_path)))
    cases = ["ADT_A03/basic.hl7", "ADT_A03/council_bedford.hl7", "ADT_A03/unrouted_postcode.hl7"]
    with MllpClient("127.0.0.1", process.port, timeout=20) as client:
        acks = [ack_fields(client.send(golden_message(c)))["MSA"][1] for c in cases]
    assert acks == ["AA", "AA", "AA"]
    process.wait_for_log("message.delivered", count=2)
    time.sleep(0.5)  # a wrong third delivery would show up by now
    assert _control_ids(tmp_path / "out-mk") == ["MSG00001"]
    assert _control_ids(tmp_path / "out-bedford") == ["A03-BED"]
    (unrouted,) = [line for line in process.log_lines() if line.get("event") == "message.unrouted"]
    assert unrouted["message_control_id"] == "A03-LUTON"


def _control_ids(folder: Path) -> list[str]:
    """MSH-10 of each bundle file a directory target wrote (named facility_control-id_outbox-id.json)."""
    return sorted(p.name.split("_")[1] for p in folder.glob("*.json"))
