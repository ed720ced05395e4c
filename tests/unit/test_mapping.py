"""Focused mapping tests: the visit life cycle, site fields and rules, routing, start-up validation, --explain."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import yaml

from adapter.errors import ConfigError, MappingError
from adapter.hl7.parse import parse
from adapter.intake import Intake, IntakeOptions
from adapter.mapping.engine import MapResult, map_message
from adapter.mapping.explain import explain, unused_fields
from adapter.mapping.loader import load_mappings
from adapter.mapping.model import MappingSet
from adapter.mapping.routing import postcode_district
from adapter.store.sqlite import SqliteStore
from tests.conftest import GOLDEN, MAPPINGS, ack_fields, golden_message

TZ = ZoneInfo("Europe/London")


@pytest.fixture(scope="module")
def mappings() -> MappingSet:
    return load_mappings(MAPPINGS)


def map_text(text: str, mappings: MappingSet, **kw: Any) -> MapResult:
    return map_message(parse(text.replace("\n", "\r").encode()), mappings, TZ, **kw)


def map_case(case: str, mappings: MappingSet, **kw: Any) -> MapResult:
    return map_message(parse((GOLDEN / f"{case}.hl7").read_bytes()), mappings, TZ, **kw)


def resources(result: MapResult, rtype: str) -> list[dict[str, Any]]:
    return [e for e in result.bundle["entry"] if e["resource"]["resourceType"] == rtype]


def site_copy(tmp_path: Path, change: Any) -> Path:
    """A copy of mappings/ whose site.yaml is passed through `change(dict)`."""
    root = tmp_path / "mappings"
    shutil.copytree(MAPPINGS, root)
    site = yaml.safe_load((root / "site.yaml").read_text())
    change(site)
    (root / "site.yaml").write_text(yaml.safe_dump(site))
    return root


def _urls(result: MapResult, rtype: str) -> set[str]:
    return {e["request"]["url"] for e in resources(result, rtype)}


def _cycle_text(event: str) -> str:
    return (GOLDEN / f"{event}/cycle.hl7").read_text(encoding="utf-8")


def _as_a08(text: str, expected: str) -> str:
    """The message as the A08 the PAS sends for the same visit (all its segments), with PV2-9 = `expected`."""
    lines = []
    for line in text.splitlines():
        fields = line.split("|")
        if fields[0] == "MSH":
            fields[8], fields[9] = "ADT^A08^ADT_A01", "CYCLE-A08"
        elif fields[0] == "EVN":
            fields[1] = "A08"
        elif fields[0] == "PV2":
            fields[9] = expected
        lines.append("|".join(fields))
    return "\n".join(lines)


class TestLifeCycle:
    def test_pending_discharge_cancel_move_the_same_resources(self, mappings: MappingSet) -> None:
        """A16 -> A03 -> A13 of one visit (PV1-19) update one Encounter, one referral and one CarePlan."""
        cycle = [map_case(f"{event}/cycle", mappings) for event in ("ADT_A16", "ADT_A03", "ADT_A13")]
        for rtype in ("Encounter", "ServiceRequest", "CarePlan", "Patient", "RelatedPerson"):
            urls = {(e["fullUrl"], e["request"]["url"]) for r in cycle for e in resources(r, rtype)}
            assert len(urls) == 1, f"{rtype} is not the same resource across the cycle: {urls}"
        status = [{rt: resources(r, rt)[0]["resource"]["status"] for rt in ("Encounter", "CarePlan")} for r in cycle]
        assert status == [
            {"Encounter": "in-progress", "CarePlan": "draft"},
            {"Encounter": "finished", "CarePlan": "active"},
            {"Encounter": "in-progress", "CarePlan": "revoked"},
        ]
        referral = [resources(r, "ServiceRequest")[0]["resource"] for r in cycle]
        # occurrence: expected date (PV2-9), actual discharge (PV1-45), the new expected date.
        assert [s["occurrenceDateTime"] for s in referral] == ["2026-11-24", "2026-11-24T10:45:00+00:00", "2026-11-26"]
        assert "end" not in resources(cycle[2], "Encounter")[0]["resource"]["period"]

    def test_cancel_discharge_puts_the_referral_back_to_its_pre_discharge_state(self, mappings: MappingSet) -> None:
        """An A13 carrying what the A16 carried gives the A16's Patient, Encounter and referral exactly; only the plan is revoked."""
        pending = map_case("ADT_A16/cycle", mappings)
        text = (GOLDEN / "ADT_A13/cycle.hl7").read_text(encoding="utf-8")
        # The same expected date (PV2-9) and event time (EVN-2, the referral's authoredOn) as the A16.
        text = text.replace("|20261126", "|20261124").replace("EVN|A13|20261124155500", "EVN|A13|20261121085500")
        cancelled = map_message(parse(text.encode()), mappings, TZ)
        for rtype in ("Patient", "Encounter", "ServiceRequest"):
            assert resources(cancelled, rtype) == resources(pending, rtype), rtype
        plan = resources(cancelled, "CarePlan")[0]["resource"]
        assert plan["status"] == "revoked" and "period" not in plan
        assert {a["detail"]["status"] for a in plan["activity"] if "detail" in a} == {"cancelled"}

    def test_update_moves_the_referral_to_a_changed_expected_date(self, mappings: MappingSet) -> None:
        """A08 of a visit in discharge planning (ZDS sent): the A16's referral, same resource and content, dated with the new PV2-9."""
        pending = map_case("ADT_A16/cycle", mappings)
        update = map_text(_as_a08(_cycle_text("ADT_A16"), expected="20261127"), mappings)
        assert _urls(update, "ServiceRequest") == _urls(pending, "ServiceRequest")
        assert _urls(update, "Encounter") == _urls(pending, "Encounter")
        before, after = (resources(r, "ServiceRequest")[0]["resource"] for r in (pending, update))
        assert (before["occurrenceDateTime"], after["occurrenceDateTime"]) == ("2026-11-24", "2026-11-27")
        for element in ("status", "category", "code", "orderDetail", "reasonCode", "performer", "extension"):
            assert after[element] == before[element], element
        encounter = resources(update, "Encounter")[0]["resource"]
        assert encounter["status"] == "in-progress"
        assert encounter["extension"][0]["valueDateTime"] == "2026-11-27"
        assert resources(update, "CarePlan") == []  # A08 leaves the plan alone

    def test_update_with_an_expected_date_alone_refers_nobody(self, mappings: MappingSet) -> None:
        """A08 with PV2-9 but no discharge planning (no pathway): the Encounter's planned end moves, no referral is sent."""
        text = "\n".join(line for line in _cycle_text("ADT_A16").splitlines() if not line.startswith("ZDS"))
        update = map_text(_as_a08(text, expected="20261127"), mappings)
        assert resources(update, "ServiceRequest") == []
        assert resources(update, "Encounter")[0]["resource"]["extension"][0]["valueDateTime"] == "2026-11-27"

    def test_update_after_discharge_keeps_the_actual_date(self, mappings: MappingSet) -> None:
        """A08 sent after the A03 (PV1-45 present): the referral keeps the actual discharge time, as the A03 sent it."""
        discharged = map_case("ADT_A03/cycle", mappings)
        update = map_text(_as_a08(_cycle_text("ADT_A03"), expected="20261127"), mappings)
        before, after = (resources(r, "ServiceRequest")[0]["resource"] for r in (discharged, update))
        assert after["occurrenceDateTime"] == before["occurrenceDateTime"] == "2026-11-24T10:45:00+00:00"
        assert resources(update, "Encounter")[0]["resource"]["status"] == "finished"

    def test_update_without_a_visit_sends_no_visit_resources(self, mappings: MappingSet) -> None:
        """A08 with the discharge-planning fields but no PV1-19 updates the Patient; no Encounter or referral, not refused."""
        text = "\n".join(line for line in _cycle_text("ADT_A16").splitlines() if not line.startswith("PV1"))
        update = map_text(_as_a08(text, expected="20261127"), mappings)
        assert [e["resource"]["resourceType"] for e in update.bundle["entry"]] == [
            "Patient",
            "Organization",
            "RelatedPerson",
            "Provenance",
        ]

    def test_next_of_kin_keep_their_resources_whatever_the_order(self, mappings: MappingSet) -> None:
        """NK1s sent in another order, with a new one first, still update the same RelatedPerson each (keyed by NK1-2)."""
        text = (GOLDEN / "ADT_A03/v26_full.hl7").read_text(encoding="utf-8")
        lines = text.splitlines()
        nk1 = [line for line in lines if line.startswith("NK1")]
        others = [line for line in lines if not line.startswith("NK1")]
        reordered = [*others[:4], "NK1|1|BROWN^PAT|FND^Friend", *nk1[::-1], *others[4:]]

        def people(result: MapResult) -> dict[str, str]:
            return {e["resource"]["name"][0]["family"]: e["request"]["url"] for e in resources(result, "RelatedPerson")}

        before, after = people(map_text(text, mappings)), people(map_text("\n".join(reordered), mappings))
        assert before.items() <= after.items() and set(after) == {"SMITH", "JONES", "BROWN"}

    def test_the_same_name_twice_gives_two_resources(self, mappings: MappingSet) -> None:
        """Two NK1s with one name (a father and son, say) are told apart by their place: two entries, distinct fullUrls."""
        text = (GOLDEN / "ADT_A08/next_of_kin.hl7").read_text(encoding="utf-8")
        (line,) = [line for line in text.splitlines() if line.startswith("NK1")]
        result = map_text(text.replace(line, f"{line}\n{line.replace('NK1|1|', 'NK1|2|')}"), mappings)
        assert len({e["fullUrl"] for e in resources(result, "RelatedPerson")}) == 2

    def test_admission_transfer_leave_and_cancel_move_one_encounter(self, mappings: MappingSet) -> None:
        """A01 -> A02 -> A21 -> A22 -> A12 -> A11 of one visit update one Encounter: location, leave, back, error."""
        cases = [
            "ADT_A01/medical_admission",
            "ADT_A02/transfer",
            "ADT_A21/leave_out",
            "ADT_A22/leave_return",
            "ADT_A12/cancel_transfer",
            "ADT_A11/cancel_admit",
        ]
        results = [map_case(case, mappings) for case in cases]
        assert len({url for r in results for url in _urls(r, "Encounter")}) == 1
        assert len({url for r in results for url in _urls(r, "Patient")}) == 1
        states = [
            (e["status"], [loc["location"]["display"] for loc in e["location"]])
            for e in (resources(r, "Encounter")[0]["resource"] for r in results)
        ]
        assert states == [
            ("in-progress", ["WARD7"]),
            ("in-progress", ["WARD9"]),
            ("onleave", ["WARD7"]),
            ("in-progress", ["WARD7"]),
            ("in-progress", ["WARD7"]),
            ("entered-in-error", ["WARD7"]),
        ]
        # Only the cancellations touch the referral and the plan (both withdrawn); admission, move and leave do not.
        touched = [
            sorted({e["resource"]["resourceType"] for e in r.bundle["entry"]} & {"ServiceRequest", "CarePlan"})
            for r in results
        ]
        assert touched == [[], [], [], [], ["CarePlan", "ServiceRequest"], ["CarePlan", "ServiceRequest"]]

    def test_cancel_transfer_returns_to_the_previous_location(self, mappings: MappingSet) -> None:
        """A12: the Encounter is in progress at PV1-3 (where the patient stays), not PV1-6 (the cancelled move); referral and plan revoked."""
        result = map_case("ADT_A12/cancel_transfer", mappings)
        encounter = resources(result, "Encounter")[0]["resource"]
        assert encounter["status"] == "in-progress"
        assert [loc["location"]["display"] for loc in encounter["location"]] == ["WARD7"]
        assert resources(result, "ServiceRequest")[0]["resource"]["status"] == "revoked"
        assert resources(result, "CarePlan")[0]["resource"]["status"] == "revoked"

    def test_cancel_admit_withdraws_referral_and_plan(self, mappings: MappingSet) -> None:
        """A11 marks the Encounter entered-in-error and revokes the visit's referral and CarePlan."""
        result = map_case("ADT_A11/cancel_admit", mappings)
        assert resources(result, "Encounter")[0]["resource"]["status"] == "entered-in-error"
        assert resources(result, "ServiceRequest")[0]["resource"]["status"] == "revoked"
        assert resources(result, "CarePlan")[0]["resource"]["status"] == "revoked"

    def test_merge_links_both_records_and_deletes_nothing(self, mappings: MappingSet) -> None:
        """A40: the survivor `replaces` the MRG-1 record, which is linked `replaced-by`; both are PUT, none deleted."""
        result = map_case("ADT_A40/merge", mappings)
        survivor, prior = (e for e in resources(result, "Patient"))
        assert survivor["resource"]["link"] == [{"other": {"reference": prior["fullUrl"]}, "type": "replaces"}]
        assert prior["resource"]["link"] == [{"other": {"reference": survivor["fullUrl"]}, "type": "replaced-by"}]
        assert {e["request"]["method"] for e in result.bundle["entry"]} == {"PUT"}


class TestContentRules:
    def test_bad_nhs_number_is_a_flagged_local_identifier(self, mappings: MappingSet) -> None:
        """PID-3 with a failing modulus-11 check digit is never sent as an NHS number, and is flagged."""
        result = map_case("ADT_A03/bad_nhs_number", mappings)
        identifiers = resources(result, "Patient")[0]["resource"]["identifier"]
        assert all(i["system"] != "https://fhir.nhs.uk/Id/nhs-number" for i in identifiers)
        assert any(i["system"].endswith("/nhs-number-failed-check") for i in identifiers)
        assert any("PID-3" in flag and "invalid NHS number" in flag for flag in result.flags)

    def test_an_nhs_number_in_other_digits_is_a_flagged_local_identifier(self, mappings: MappingSet) -> None:
        """Ten superscript or Arabic-Indic digits (str.isdigit() says digits) are not an NHS number: kept as a
        flagged local identifier, like a failed check digit, not an internal error."""
        raw = (GOLDEN / "ADT_A03/bad_nhs_number.hl7").read_bytes()
        for digits in ("\u00b2" * 10, "\u0669" * 10):
            result = map_message(parse(raw.replace(b"9449305553", digits.encode())), mappings, TZ)
            identifiers = resources(result, "Patient")[0]["resource"]["identifier"]
            assert all(i["system"] != "https://fhir.nhs.uk/Id/nhs-number" for i in identifiers)
            assert any(i["system"].endswith("/nhs-number-failed-check") for i in identifiers)

    def test_verification_status_from_pid_32(self, mappings: MappingSet) -> None:
        """PID-32 = 01 puts the UK Core verification-status extension on the NHS number."""
        nhs = resources(map_case("ADT_A03/v26_full", mappings), "Patient")[0]["resource"]["identifier"][0]
        (extension,) = nhs["extension"]
        assert extension["url"].endswith("Extension-UKCore-NHSNumberVerificationStatus")
        assert extension["valueCodeableConcept"]["coding"][0]["code"] == "01"

    def test_social_admission_makes_an_urgent_referral(self, mappings: MappingSet) -> None:
        """A01 with admit reason carer breakdown (PV2-3) makes an urgent referral; a medical admission none."""
        social = resources(map_case("ADT_A01/social_admission", mappings), "ServiceRequest")
        assert [s["resource"]["priority"] for s in social] == ["urgent"]
        assert resources(map_case("ADT_A01/medical_admission", mappings), "ServiceRequest") == []

    def test_social_registration_makes_an_urgent_referral_too(self, mappings: MappingSet) -> None:
        """A04 follows the same site rule as A01: a carer breakdown gives an urgent Home Stay referral, a plain registration none."""
        (social,) = resources(map_case("ADT_A04/social_admission", mappings), "ServiceRequest")
        assert social["resource"]["priority"] == "urgent"
        assert "home-stay" in json.dumps(social["resource"]["orderDetail"])
        assert resources(map_case("ADT_A04/registration", mappings), "ServiceRequest") == []

    def test_the_social_admission_rule_is_site_data(self, tmp_path: Path) -> None:
        """Edit rules.social_admission in site.yaml (here: chest pain) and that admission gets the urgent referral, no code change."""
        root = site_copy(
            tmp_path, lambda s: s["rules"].update(social_admission={"field": "@admit_reason", "equals": "chestpain"})
        )
        edited = load_mappings(root)
        (referral,) = resources(map_case("ADT_A01/medical_admission", edited), "ServiceRequest")
        assert referral["resource"]["priority"] == "urgent"
        assert resources(map_case("ADT_A01/social_admission", edited), "ServiceRequest") == []

    @pytest.mark.parametrize(
        ("zone", "start", "end"),
        [
            ("Europe/London", "2026-11-20T08:30:00+00:00", "2026-11-24T10:15:00+00:00"),  # GMT
            ("Asia/Kolkata", "2026-11-20T08:30:00+05:30", "2026-11-24T10:15:00+05:30"),
            ("UTC", "2026-11-20T08:30:00+00:00", "2026-11-24T10:15:00+00:00"),
        ],
    )
    def test_times_take_the_feeds_time_zone(self, mappings: MappingSet, zone: str, start: str, end: str) -> None:
        """v2 times without an offset are read in the configured zone and written with seconds and that offset."""
        message = parse((GOLDEN / "ADT_A03/basic.hl7").read_bytes())
        result = map_message(message, mappings, ZoneInfo(zone))
        assert resources(result, "Encounter")[0]["resource"]["period"] == {"start": start, "end": end}

    def test_summer_time_and_winter_time_in_london(self, mappings: MappingSet) -> None:
        """The default zone gives +01:00 in July (BST) and +00:00 in November (GMT), from the same wall-clock fields."""
        summer = resources(map_case("ADT_A03/bst_offset", mappings), "Encounter")[0]["resource"]["period"]
        winter = resources(map_case("ADT_A03/basic", mappings), "Encounter")[0]["resource"]["period"]
        assert summer["end"] == "2026-07-15T10:15:00+01:00" and winter["end"] == "2026-11-24T10:15:00+00:00"

    @pytest.mark.parametrize(
        ("wall_clock", "written"),
        [
            ("20261025013000", "2026-10-25T01:30:00+01:00"),  # 01:30 happens twice as clocks go back: the first (BST)
            ("20260329013000", "2026-03-29T01:30:00+00:00"),  # 01:30 never happens as clocks go forward: read as GMT
            ("20260329023000", "2026-03-29T02:30:00+01:00"),  # just after the change: BST
        ],
        ids=["clocks-back", "clocks-forward-gap", "after-clocks-forward"],
    )
    def test_the_nights_the_clocks_change(self, mappings: MappingSet, wall_clock: str, written: str) -> None:
        """A wall-clock PV1-45 on a change-over night in London gets one definite offset, never an error or a guess that varies."""
        text = (GOLDEN / "ADT_A03/basic.hl7").read_text(encoding="utf-8").replace("|20261124101500", f"|{wall_clock}")
        assert resources(map_text(text, mappings), "Encounter")[0]["resource"]["period"]["end"] == written

    def test_a_reason_given_twice_is_sent_once(self, mappings: MappingSet) -> None:
        """PV2-3 delirium (SNOMED 2776000 via the code table) and a DG1 with the same code: one reasonCode, then the ICD-10 one."""
        referral = resources(map_case("ADT_A03/v26_full", mappings), "ServiceRequest")[0]["resource"]
        codes = [(c["coding"][0]["system"], c["coding"][0]["code"]) for c in referral["reasonCode"]]
        assert codes == [("http://snomed.info/sct", "2776000"), ("http://hl7.org/fhir/sid/icd-10", "F05.9")]

        """Services BRIDGING~REABLE~EQUIP: one activity each after the referral, and a 7-day plan."""
        plan = resources(map_case("ADT_A03/v26_full", mappings), "CarePlan")[0]["resource"]
        codes = [a["detail"]["code"]["coding"][0]["code"] for a in plan["activity"][1:]]
        assert codes == ["bridging-care", "reablement", "equipment"]
        assert plan["period"] == {"start": "2026-11-24T10:15:00+00:00", "end": "2026-12-01T10:15:00+00:00"}

    def test_unmapped_codes_follow_the_table_policy_and_are_noted(self, mappings: MappingSet) -> None:
        """Values no code table lists become a default, text or nothing, as each table says; each is noted once."""
        result = map_case("ADT_A03/unknown_codes", mappings)
        assert resources(result, "Patient")[0]["resource"]["gender"] == "unknown"  # 0001: default U
        encounter = resources(result, "Encounter")[0]["resource"]
        assert encounter["hospitalization"]["dischargeDisposition"] == {"text": "HOMEX"}  # text policy
        assert "PV1-36: value not in vocabulary DischargeDestination; carried as text" in result.flags
        assert len(result.flags) == len(set(result.flags))
        assert not any("HOMEX" in flag for flag in result.flags)  # notes name fields, never values

    def test_death_on_the_ward(self, mappings: MappingSet) -> None:
        """PV1-36 79 and PID-29: the Patient gets deceasedDateTime in the feed's zone."""
        result = map_case("ADT_A03/died", mappings)
        assert resources(result, "Patient")[0]["resource"]["deceasedDateTime"] == "2026-11-24T06:10:00+00:00"

    @pytest.mark.parametrize(
        ("old", "new", "location"),
        [
            ("9449305552^^^NHS^NH~RRK123456^^^RRK^MR", "9449305551^^^NHS^NH", "PID-3"),  # only a failed NHS number
            ("|PAS|RRK|", "|PAS||", "MSH-4"),  # no sending facility: no hospital Organization
        ],
        ids=["patient", "hospital"],
    )
    def test_no_identifier_to_match_on_names_the_field(
        self, mappings: MappingSet, old: str, new: str, location: str
    ) -> None:
        """A resource that can only be written by its identifier, and has none, is refused naming the field it comes from."""
        text = (GOLDEN / "ADT_A08/demographics_only.hl7").read_text(encoding="utf-8")
        assert old in text
        with pytest.raises(MappingError) as info:
            map_text(text.replace(old, new), mappings)
        assert (info.value.location, info.value.hl7_error_code) == (location, "101")

    def test_missing_required_field_names_it(self, mappings: MappingSet) -> None:
        """An A03 without PV1-19 is refused with the field named (ERR-2 of the AE)."""
        with pytest.raises(MappingError) as info:
            map_case("ADT_A03/no_visit_number", mappings)
        assert info.value.location == "PV1-19" and info.value.hl7_error_code == "101"


class TestSiteFields:
    def test_pathway_from_an_obx_picked_by_its_code(self, tmp_path: Path) -> None:
        """`pathway: OBX[3=PATHWAY]-5` in site.yaml reads the pathway from that OBX, with no code change."""
        root = site_copy(tmp_path, lambda s: s["fields"].update(pathway="OBX[3=PATHWAY]-5"))
        result = map_case("ADT_A16/obx_not_used", load_mappings(root))
        categories = resources(result, "ServiceRequest")[0]["resource"]["category"]
        assert categories[1]["coding"][0]["code"] == "1"
        assert "OBX (whole segment)" not in unused_fields(
            parse((GOLDEN / "ADT_A16/obx_not_used.hl7").read_bytes()), result
        )

    def test_a_selected_code_may_hold_a_hyphen(self, tmp_path: Path) -> None:
        """`OBX[3=DISCH-PATH]-5`: the field is read after the selector's closing bracket, not at its first hyphen."""
        root = site_copy(tmp_path, lambda s: s["fields"].update(pathway="OBX[3=DISCH-PATH]-5"))
        text = (GOLDEN / "ADT_A16/obx_not_used.hl7").read_text(encoding="utf-8")
        assert "|PATHWAY^" in text
        result = map_text(text.replace("|PATHWAY^", "|DISCH-PATH^"), load_mappings(root))
        categories = resources(result, "ServiceRequest")[0]["resource"]["category"]
        assert categories[1]["coding"][0]["code"] == "1"

    def test_pathway_ready_date_and_services_from_obx_instead_of_zds(self, tmp_path: Path) -> None:
        """A feed with no ZDS: site.yaml points the three local fields at OBX segments, and the referral and plan come out the same."""

        def change(site: dict[str, Any]) -> None:
            site["fields"].update(
                pathway="OBX[3=PATHWAY]-5", discharge_ready_date="OBX[3=DRD]-5", services="OBX[3=SERVICES]-5"
            )

        zds = map_case("ADT_A16/basic", load_mappings(MAPPINGS))
        text = (GOLDEN / "ADT_A16/basic.hl7").read_text(encoding="utf-8")
        (zds_line,) = [line for line in text.splitlines() if line.startswith("ZDS")]
        _, pathway, ready, services = zds_line.split("|")[:4]
        obx = [
            f"OBX|1|ST|PATHWAY^Discharge pathway^L||{pathway}",
            f"OBX|2|DT|DRD^Discharge ready date^L||{ready}",
            f"OBX|3|ST|SERVICES^Services needed^L||{services}",
        ]
        moved = "\n".join([line for line in text.splitlines() if not line.startswith("ZDS")] + obx)
        result = map_text(moved, load_mappings(site_copy(tmp_path, change)))
        for rtype in ("ServiceRequest", "CarePlan"):
            assert resources(result, rtype) == resources(zds, rtype), rtype
        referral = resources(result, "ServiceRequest")[0]["resource"]
        assert referral["extension"][0]["valueDate"] and len(referral["orderDetail"]) == len(services.split("~"))

    def test_an_ignored_event_needs_no_map(self, tmp_path: Path) -> None:
        """Events set to `ignore` load without a message map; the set of processed events is site data."""
        root = site_copy(tmp_path, lambda s: s["events"].update(A21="ignore"))
        (root / "messages" / "ADT_A21.yaml").unlink()
        assert "A21" not in load_mappings(root).messages


class TestCodeTables:
    def test_local_codes_are_marked_unconfirmed(self, mappings: MappingSet) -> None:
        """Every code shipped in a Homeward CodeSystem is marked national_code_confirmed: false, and no national one is."""
        for vocab in mappings.vocabularies.values():
            for v2_code, entry in vocab.codes.items():
                local = entry.get("system", vocab.system).startswith("https://homeward.example.org/fhir/CodeSystem/")
                assert local == (v2_code in vocab.unconfirmed), f"{vocab.name} {v2_code}"
                assert "national_code_confirmed" not in entry  # the flag never reaches a Coding
        # Pathway, services and carer breakdown: the ones DOMAIN.md found no confirmed code for.
        assert {"DischargePathway", "DischargeService"} <= {
            v.name for v in mappings.vocabularies.values() if not v.national_code_confirmed
        }
        assert mappings.vocabularies["ReferralReason"].unconfirmed == {"CARERBRK"}

    def test_unmapped_error_policy_refuses_with_ae_103(self, tmp_path: Path) -> None:
        """A table set to `unmapped: error` refuses a value it does not list: AE, ERR-3 103, ERR-2 the field; kept as refused."""
        root = site_copy(tmp_path, lambda s: None)
        table = root / "vocabulary" / "DischargeDestination.yaml"
        data = yaml.safe_load(table.read_text())
        data["unmapped"] = "error"
        table.write_text(yaml.safe_dump(data))
        mappings = load_mappings(root)
        with pytest.raises(MappingError) as info:
            map_case("ADT_A03/unknown_codes", mappings)
        assert (info.value.location, info.value.hl7_error_code) == ("PV1-36", "103")
        store = SqliteStore(tmp_path / "store.sqlite3")
        try:
            intake = Intake(store, mappings, IntakeOptions())
            ack = ack_fields(asyncio.run(intake.frame(golden_message("ADT_A03/unknown_codes.hl7"), "test")))
            assert (ack["MSA"][1], ack["ERR"][2], ack["ERR"][3].split("^")[0]) == ("AE", "PV1^1^36", "103")
            assert "HOMEX" not in ack["ERR"][8]  # the reason names the field and the table, not the value
            assert [tuple(r) for r in store.query("SELECT outcome FROM inbound")] == [("refused",)]
        finally:
            store.close()


class TestRouting:
    @pytest.mark.parametrize(
        ("postcode", "district"), [("MK9 1AA", "MK9"), ("mk40 1ab", "MK40"), ("MK401AB", "MK40"), ("", "")]
    )
    def test_postcode_district(self, postcode: str, district: str) -> None:
        """The outward code of a postcode, with or without its space."""
        assert postcode_district(postcode) == district

    def test_two_councils(self, mappings: MappingSet) -> None:
        """MK9 goes to Milton Keynes, MK40 to Bedford: each council is the referral's performer."""
        for case, council in (("ADT_A03/basic", "Milton Keynes"), ("ADT_A03/council_bedford", "Bedford")):
            result = map_case(case, mappings)
            (performer,) = resources(result, "ServiceRequest")[0]["resource"]["performer"]
            assert performer["display"].startswith(council)

    def test_several_routes_join_their_targets(self, tmp_path: Path) -> None:
        """A message every route matches goes to each route's targets, once each, in order."""

        def change(site: dict[str, Any]) -> None:
            site["routing"]["routes"].append(
                {"name": "pathway-3", "when": {"field": "ZDS-1", "equals": "3"}, "targets": ["broker"]}
            )

        result = map_case("ADT_A03/care_home_pathway3", load_mappings(site_copy(tmp_path, change)))
        assert result.route.targets == ("default", "broker")
        assert result.route.matched == ("milton-keynes", "pathway-3")

    def test_unrouted_message_is_kept_and_reported(self, tmp_path: Path) -> None:
        """With `unrouted: {}`, a Luton postcode gets AA, is stored with outcome 'unrouted', and nothing is queued."""
        mappings = load_mappings(site_copy(tmp_path, lambda s: s["routing"].update(unrouted={})))
        store = SqliteStore(tmp_path / "store.sqlite3")
        try:
            intake = Intake(store, mappings, IntakeOptions())
            ack = asyncio.run(
                intake.frame((GOLDEN / "ADT_A03/unrouted_postcode.hl7").read_bytes().replace(b"\n", b"\r"), "test")
            )
            assert b"MSA|AA|A03-LUTON" in ack
            rows = store.query("SELECT outcome, reason FROM inbound")
            assert [(r[0], "routing" in r[1]) for r in rows] == [("unrouted", True)]
            assert store.query("SELECT count(*) FROM outbox")[0][0] == 0
        finally:
            store.close()


class TestStartupValidation:
    @pytest.mark.parametrize(
        ("change", "expected"),
        [
            (lambda s: s["fields"].update(pathway="ZDS1"), "site.yaml: fields.pathway"),
            (
                lambda s: (
                    s["routing"]["routes"][0].pop("postcode_districts")
                    and s["routing"]["routes"][0].pop("local_authorities")
                ),
                "site.yaml: routing.routes[0]",
            ),
            (
                lambda s: s["routing"]["routes"][0].update(targets="default"),
                "site.yaml: routing.routes[0]: targets: expected list",
            ),
            (lambda s: s["rules"].update(bridging_care={"rule": "nope"}), "site.yaml: rules.bridging_care"),
            (
                lambda s: s["rules"].update(discharge_planning={"all": []}),
                "rules.discharge_planning: all: expected a list",
            ),
            (
                lambda s: s["rules"].update(discharge_planning={"all": [{"field": "ZDS1", "present": True}]}),
                "rules.discharge_planning: all[0]: field",
            ),
            (lambda s: s["fields"].pop("services"), "'@services' is not named in site.yaml fields"),
            (lambda s: s["events"].update(A05="process"), "events.A05: 'process' but no messages/ADT_A05.yaml"),
        ],
        ids=[
            "bad-location",
            "route-without-rule",
            "targets-not-a-list",
            "unknown-rule",
            "empty-all",
            "bad-location-in-all",
            "unknown-field",
            "no-map",
        ],
    )
    def test_errors_name_file_and_key(self, tmp_path: Path, change: Any, expected: str) -> None:
        """A broken site.yaml stops start-up with ConfigError naming the file and the key."""
        root = site_copy(tmp_path, change)
        with pytest.raises(ConfigError) as info:
            load_mappings(root)
        assert expected in str(info.value)

    @pytest.mark.parametrize(
        ("file", "change", "expected"),
        [
            (
                "segments/Referral-ServiceRequest.yaml",
                lambda d: d["rules"][1].update(unique=True),  # intent: one value
                "Referral-ServiceRequest.yaml: rules[1]: unique: only for a repeating element",
            ),
            (
                "messages/ADT_A03.yaml",
                lambda d: d["resources"][5].update(anchor_fields=["NK12"]),
                "ADT_A03.yaml: resources[5]: anchor_fields[0]",
            ),
            (
                "vocabulary/DischargeDestination.yaml",
                lambda d: d.update(unmapped="guess"),
                "DischargeDestination.yaml: unmapped: expected error | default | omit | text",
            ),
            (
                "vocabulary/0001-AdministrativeGender.yaml",
                lambda d: d.update(default="Q"),
                "0001-AdministrativeGender.yaml: default: must name a key of map",
            ),
            (
                "vocabulary/DischargeService.yaml",
                lambda d: d["map"].update(BRIDGING={"display": "no code"}),
                "DischargeService.yaml: map.BRIDGING: expected a code",
            ),
            (
                "vocabulary/DischargePathway.yaml",
                lambda d: d.pop("system"),
                "DischargePathway.yaml: missing key 'system'",
            ),
            (
                "segments/PID-Patient.yaml",
                lambda d: d["rules"][0].update(element="nhsNumber"),
                "PID-Patient.yaml: rules[0]: element:",
            ),
            (
                "vocabulary/ReferralReason.yaml",
                lambda d: d["map"]["CARERBRK"].update(national_code_confirmed="no"),
                "ReferralReason.yaml: map.CARERBRK: national_code_confirmed: expected true or false",
            ),
        ],
        ids=[
            "unique-on-a-single-element",
            "anchor-field",
            "unmapped-policy",
            "default-not-in-map",
            "entry-without-code",
            "no-system",
            "unknown-element",
            "flag-not-bool",
        ],
    )
    def test_bad_mapping_files_name_file_and_key(self, tmp_path: Path, file: str, change: Any, expected: str) -> None:
        """A code table or segment map an engineer broke stops start-up with the file and key named."""
        root = site_copy(tmp_path, lambda s: None)
        data = yaml.safe_load((root / file).read_text())
        change(data)
        (root / file).write_text(yaml.safe_dump(data))
        with pytest.raises(ConfigError) as info:
            load_mappings(root)
        assert expected in str(info.value)

    def test_rule_errors_name_the_mapping_file_and_rule(self, tmp_path: Path) -> None:
        """A template without `into`, in a message map, is refused naming the file and rule index."""
        root = site_copy(tmp_path, lambda s: None)
        path = root / "messages" / "ADT_A03.yaml"
        data = yaml.safe_load(path.read_text())
        data["resources"][4]["rules"][3].pop("into")
        path.write_text(yaml.safe_dump(data))
        with pytest.raises(ConfigError) as info:
            load_mappings(root)
        assert "ADT_A03.yaml: resources[4].rules[3]: template: needs into" in str(info.value)


class TestExplain:
    def test_explain_names_rules_and_unused_fields(self, mappings: MappingSet) -> None:
        """--explain ties each element to its field and rule file, and lists what no rule read."""
        message = parse((GOLDEN / "ADT_A16/obx_not_used.hl7").read_bytes())
        lines = explain(message, map_message(message, mappings, TZ, explain=True))
        assert any("Patient.identifier" in line and "PID-3" in line and "PID-Patient.yaml" in line for line in lines)
        assert any("Encounter.extension" in line and "PV2-9" in line for line in lines)
        assert lines[-1] == "not used by any rule: EVN-1, PID-1, PV1-1, OBX (whole segment)"

    def test_explain_says_which_resource_a_condition_left_out(self, mappings: MappingSet) -> None:
        """An A08 with an expected date but no pathway: --explain names the referral its `when:` left out, and where."""
        message = parse((GOLDEN / "ADT_A08/expected_date_only.hl7").read_bytes())
        lines = explain(message, map_message(message, mappings, TZ, explain=True))
        (line,) = [line for line in lines if "not built" in line]
        assert line.split()[0] == "ServiceRequest" and "ADT_A08.yaml: resources[3]" in line

        """An A03 with PD1, NK1, PV2, DG1, NTE and ZDS: every field carried is mapped but set ids and PV2-9."""
        message = parse((GOLDEN / "ADT_A03/v26_full.hl7").read_bytes())
        result = map_message(message, mappings, TZ)
        # PV2-9 (expected discharge) means nothing once the patient has left: A03 maps PV1-45 instead.
        assert unused_fields(message, result) == ["EVN-1", "PID-1", "NK1-1", "PV1-1", "PV2-9", "DG1-1", "NTE-1"]


class TestIntakeOutcomes:
    """What the sender and the store see, through the real intake and a real SQLite file."""

    def run(self, tmp_path: Path, mappings: MappingSet, *cases: str) -> tuple[list[dict[str, list[str]]], SqliteStore]:
        store = SqliteStore(tmp_path / "store.sqlite3")
        intake = Intake(store, mappings, IntakeOptions())
        acks = [ack_fields(asyncio.run(intake.frame(golden_message(f"{case}.hl7"), "test"))) for case in cases]
        return acks, store

    @pytest.mark.parametrize(
        ("case", "location", "erl"),
        [("ADT_A03/no_pv1", "PV1", "PV1^1"), ("ADT_A03/no_patient_identifier", "PID-3", "PID^1^3")],
    )
    def test_refusal_is_ae_with_err_naming_the_field(
        self, tmp_path: Path, mappings: MappingSet, case: str, location: str, erl: str
    ) -> None:
        """An A03 lacking PV1 or any patient identifier: AE, ERR-2 names the field, ERR-3 101; kept with its reason."""
        (ack,), store = self.run(tmp_path, mappings, case)
        try:
            assert ack["MSA"][1] == "AE"
            assert ack["ERR"][2] == erl and ack["ERR"][3].startswith("101^")  # ERR-2 is an ERL: segment^seq^field
            assert location in ack["ERR"][8]
            ((outcome, reason, raw),) = store.query("SELECT outcome, reason, raw FROM inbound")
            assert outcome == "refused" and location in reason
            assert bytes(raw) == golden_message(f"{case}.hl7")  # the original is kept as received
            assert store.query("SELECT count(*) FROM outbox")[0][0] == 0
            assert [r[0] for r in store.query("SELECT stage FROM audit ORDER BY id")] == ["received", "refused"]
        finally:
            store.close()

    def test_an_ignored_event_is_acknowledged_and_recorded_as_filtered(self, tmp_path: Path) -> None:
        """With A21 set to `ignore` in site.yaml, an A21 gets AA, is kept as filtered, and nothing is queued."""
        mappings = load_mappings(site_copy(tmp_path, lambda s: s["events"].update(A21="ignore")))
        acks, store = self.run(tmp_path, mappings, "ADT_A21/leave_out", "ADT_A22/leave_return")
        try:
            assert [ack["MSA"][1] for ack in acks] == ["AA", "AA"]
            rows = store.query("SELECT event, outcome FROM inbound ORDER BY id")
            assert [tuple(r) for r in rows] == [("ADT^A21", "filtered"), ("ADT^A22", "accepted")]
            assert store.query("SELECT count(*) FROM outbox")[0][0] == 1
        finally:
            store.close()
