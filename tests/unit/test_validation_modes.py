"""mapping.validation: the default ("datatypes") stores the same bundles as "full", each valid R4, and refuses the same."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest

from adapter.config import MappingSettings
from adapter.intake import Intake, IntakeOptions
from adapter.mapping.loader import load_mappings
from adapter.mapping.validate import validate_bundle
from adapter.store.sqlite import SqliteStore
from tests.conftest import GOLDEN, MAPPINGS, golden_message

CASES = sorted(str(p.relative_to(GOLDEN)) for p in GOLDEN.glob("*/*.hl7"))


def intake_results(tmp_path: Path, validation: str) -> dict[str, tuple[bytes, list[bytes]]]:
    """Every golden message through an Intake in one validation mode: case -> (ACK, stored bundles)."""
    store = SqliteStore(tmp_path / f"{validation}.sqlite3")
    intake = Intake(store, load_mappings(MAPPINGS), IntakeOptions(validation=validation))
    results = {}
    try:
        for case in CASES:
            ack = asyncio.run(intake.frame(golden_message(case), "test"))
            inbound = store.query("SELECT max(id) FROM inbound")[0][0]
            bundles = [
                r[0]
                for r in store.query(
                    "SELECT b.bundle FROM outbox o JOIN outbox_body b ON b.outbox_id = o.id"
                    " WHERE o.inbound_id = ? ORDER BY o.id",
                    (inbound,),
                )
            ]
            # MSH-7 time stamps the ACK; the code and the error segment are what must agree.
            results[case] = (b"\r".join(s for s in ack.split(b"\r") if not s.startswith(b"MSH")), bundles)
    finally:
        store.close()
    return results


class TestValidationModes:
    def test_default_is_datatypes(self) -> None:
        """The shipped default is the per-value checks (README "Design notes" gives the figures)."""
        assert MappingSettings().validation == "datatypes"
        assert IntakeOptions().validation == "datatypes"

    def test_both_modes_store_the_same_valid_bundles_and_send_the_same_acks(self, tmp_path: Path) -> None:
        """For every golden case the two modes give the same ACK and byte-identical bundles, each valid R4B."""
        full = intake_results(tmp_path, "full")
        datatypes = intake_results(tmp_path, "datatypes")
        assert datatypes == full
        stored = [bundle for _, bundles in datatypes.values() for bundle in bundles]
        assert len(stored) > 20  # most golden cases are accepted: the comparison is not vacuous
        for bundle in stored:
            validate_bundle(orjson.loads(bundle))

    @pytest.mark.parametrize("validation", ["datatypes", "full"])
    def test_bad_value_is_refused_with_ae(self, tmp_path: Path, validation: str) -> None:
        """A discharge time that is not a date/time (PV1-45) gets AE 102 naming the field in either mode."""
        store = SqliteStore(tmp_path / "store.sqlite3")
        try:
            intake = Intake(store, load_mappings(MAPPINGS), IntakeOptions(validation=validation))
            ack = asyncio.run(intake.frame(golden_message("ADT_A03/bad_discharge_time.hl7"), "test"))
            assert b"\rMSA|AE|A03-BADTIME|" in ack
            assert b"\rERR||PV1^1^45|102^" in ack
            assert store.query("SELECT outcome FROM inbound")[0][0] == "refused"
            assert store.query("SELECT count(*) FROM outbox")[0][0] == 0
        finally:
            store.close()
