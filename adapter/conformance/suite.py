"""`homeward conformance`: run Homeward's needs against a live FHIR server and report each as a check.

The suite reads /metadata and compares it with conformance/'s requirements, then drives the
discharge life cycle (A16 -> A03 -> A13, a replay of all three, an A40 merge) for a clearly
marked test patient: each message is mapped with the site's own mapping files and sent by the
same FhirTarget the forwarder uses (same mode, headers, TLS and OAuth2), then read back.
Resources are checked by identifier search (exactly one each, also after the replay), status,
identifiers and references; $validate is called with Homeward's profiles where offered; and
what the run created is deleted where the server allows it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote
from zoneinfo import ZoneInfo

import httpx
import orjson

from adapter.auth import OAuth2ClientCredentials
from adapter.conformance.artefacts import EXPECTATION, PROFILES, UKCORE_FOLDER
from adapter.conformance.report import Report
from adapter.errors import DeliveryError, InboundError
from adapter.hl7.parse import parse
from adapter.mapping.engine import map_message
from adapter.mapping.model import MappingSet
from adapter.modes import identifier_of
from adapter.store.base import OutboxItem
from adapter.targets import FhirTarget

LIFE_CYCLE = ("A16", "A03", "A13")
TEST_FACILITY = "HWCONF"  # MSH-4 of every test message: all identifier systems carry it
TEST_NAME = "CONFORMANCE^HOMEWARD-TEST^^^"


def test_messages(run: str) -> dict[str, str]:
    """HL7 v2 messages for one run's test patient (no NHS number: nothing can match a real person)."""
    pid = f"PID|1||{TEST_FACILITY}-{run}^^^{TEST_FACILITY}^MR||{TEST_NAME}||19300101|U"
    pv1 = f"PV1|1|I|TESTWARD^1^^{TEST_FACILITY}||||||||||||||||{TEST_FACILITY}-V-{run}" + "|" * 25
    zds = "ZDS|1|20261123|BRIDGING~EQUIP"
    nk1 = "NK1|1|CONFORMANCE^CARER-TEST|CGV^Care giver"  # a carer, so RelatedPerson is written and checked too

    def msh(event: str, structure: str, n: int, when: str) -> str:
        return (
            f"MSH|^~\\&|CONFORMANCE|{TEST_FACILITY}|HOMEWARD|COUNCIL|{when}||ADT^{event}^{structure}|"
            f"{TEST_FACILITY}-{run}-{n}|T|2.5.1|||AL|NE\rEVN|{event}|{when}"
        )

    return {
        "A16": "\r".join(
            [
                msh("A16", "ADT_A16", 1, "20261121090000"),
                pid,
                nk1,
                pv1 + "20261118140000|",
                "PV2|||||||||20261124",
                zds,
            ]
        ),
        "A03": "\r".join(
            [
                msh("A03", "ADT_A03", 2, "20261124110000"),
                pid,
                nk1,
                pv1.replace("|" * 25, "|" * 16 + "19|HOME" + "|" * 8) + "20261118140000|20261124104500",
                "PV2|||||||||20261124",
                zds,
            ]
        ),
        "A13": "\r".join(
            [msh("A13", "ADT_A01", 3, "20261124160000"), pid, pv1 + "20261118140000|", "PV2|||||||||20261126", zds]
        ),
        "A40": "\r".join(
            [msh("A40", "ADT_A39", 4, "20261124170000"), pid, f"MRG|{TEST_FACILITY}-P-{run}^^^{TEST_FACILITY}^MR"]
        ),
    }


@dataclass
class Sent:
    """A bundle that reached the server, and what it holds."""

    event: str
    bundle: dict[str, Any]
    locations: list[str] = field(default_factory=list)


class Suite:
    def __init__(
        self,
        target: FhirTarget,
        mappings: MappingSet,
        requirements: dict[str, Any],
        profiles: list[dict[str, Any]],
        *,
        tz: ZoneInfo,
        load_profiles: bool = False,
        keep: bool = False,
        run: str | None = None,
    ):
        self.target = target
        self.client: httpx.AsyncClient = target.client  # same auth, TLS and headers as delivery
        self.base = target.base_url
        self.mappings = mappings
        self.requirements = requirements
        self.profiles = profiles
        self.tz = tz
        self.load_profiles = load_profiles
        self.keep = keep
        self.run_id = run or datetime.now(UTC).strftime("%Y%m%d%H%M%S")
        self.report = Report(target.base_url, datetime.now(UTC).isoformat(timespec="seconds"))
        self.statement: dict[str, Any] | None = None
        self.sent: list[Sent] = []
        self.found: dict[str, str] = {}  # conditional URL -> "Type/id" the server gave it
        self.created: list[str] = []

    async def run(self) -> Report:
        self.report.facts.update(test_patient_mrn=f"{TEST_FACILITY}-{self.run_id}", mode=self.target.mode)
        if not await self._authorised():
            return self.report
        await self._timed(self.metadata)
        for event in LIFE_CYCLE:
            await self._timed(self.step, event, "lifecycle")
        await self._timed(self.replay)
        await self._timed(self.step, "A40", "merge")
        await self._timed(self.merge_links)
        await self._timed(self.validate)
        await self._timed(self.cleanup)
        return self.report

    async def _timed(self, fn: Any, *args: Any) -> None:
        before = len(self.report.checks)
        started = time.perf_counter()
        try:
            await fn(*args)
        except (httpx.HTTPError, DeliveryError, ValueError, KeyError, TypeError, AttributeError) as exc:
            # A server that answers what a FHIR server would not (HTML, a wrong shape, a dropped connection)
            # fails the stage with a line saying so; the run goes on and the reports are still written.
            stage = getattr(fn, "__name__", "stage") + (f".{args[0]}" if args else "")
            self.report.add(
                f"{stage}.error",
                f"{stage} completed",
                status="failed",
                detail=f"{stage} stopped: {type(exc).__name__} (the server's answer was not what FHIR R4 specifies)",
            )
        new = self.report.checks[before:]
        for check in new:
            check.seconds = (time.perf_counter() - started) / max(len(new), 1)

    # -- OAuth2 ---------------------------------------------------------------------------------------

    async def _authorised(self) -> bool:
        """With OAuth2 configured, a token from the token endpoint first: without one nothing else can run."""
        auth = self.client.auth
        if not isinstance(auth, OAuth2ClientCredentials):
            return True
        title = "OAuth2 client credentials: access token from the token endpoint"
        self.report.facts["auth"] = "oauth2"
        try:
            await auth.token()
        except DeliveryError as exc:
            self.report.add(
                "auth.token",
                title,
                status="failed",
                detail=f"{auth.settings.token_url}: {exc.reason}; nothing else run",
            )
            return False
        self.report.add("auth.token", title, detail="access token received (client_credentials)")
        return True

    # -- /metadata --------------------------------------------------------------------------------

    async def get(self, path: str) -> httpx.Response:
        return await self.client.get(f"{self.base}/{path}")

    async def metadata(self) -> None:
        try:
            response = await self.get("metadata")
        except httpx.HTTPError as exc:
            detail = f"GET /metadata: {type(exc).__name__} (server not reachable)"
            self.report.add("metadata.read", "GET /metadata", status="failed", detail=detail)
            return
        try:
            body = response.json()
        except ValueError:  # not JSON: an HTML error page, a proxy's text
            body = {}
        if not isinstance(body, dict):
            body = {}
        if response.status_code != 200 or body.get("resourceType") != "CapabilityStatement":
            kind = body.get("resourceType", "no FHIR resource")
            self.report.add(
                "metadata.read",
                "GET /metadata returns a CapabilityStatement",
                status="failed",
                detail=f"GET /metadata: HTTP {response.status_code}, {kind} (a FHIR server must publish its CapabilityStatement)",
            )
            return
        self.statement = body
        self.report.add(
            "metadata.read", "GET /metadata returns a CapabilityStatement", detail="CapabilityStatement read"
        )
        version = str(body.get("fhirVersion", ""))
        self.report.add(
            "metadata.fhir-version",
            "FHIR R4 (4.0.x)",
            status="passed" if version.startswith("4.0") else "failed",
            detail=f"fhirVersion {version or 'missing'}"
            + ("" if version.startswith("4.0") else ", Homeward sends R4 4.0.1"),
        )
        rest: dict[str, Any] = next((r for r in body.get("rest", []) if r.get("mode") == "server"), {})
        self.report.facts["server_software"] = body.get("software", {}).get("name", "")
        self._formats(body)
        self._security(rest)
        wanted = self.requirements["rest"][0]
        offered_system = {i.get("code") for i in rest.get("interaction", [])}
        for item in wanted.get("interaction", []):
            level = _expectation(item)
            code = item["code"]
            needed = code == self.target.mode  # transaction, or batch when the site sends batches
            present = code in offered_system
            self.report.add(
                f"metadata.{code}",
                f"system interaction {code} ({level})",
                required=needed,
                status="passed" if present else "failed",
                detail=f"{code}: declared"
                if present
                else f"{code}: not declared in rest.interaction" + ("" if needed else " (optional)"),
            )
        offered = {r.get("type"): r for r in rest.get("resource", [])}
        for resource in wanted.get("resource", []):
            have = offered.get(resource["type"], {})
            missing, optional = _resource_gaps(resource, have)
            rtype = resource["type"]
            self.report.add(
                f"metadata.{rtype}",
                f"{rtype}: what Homeward needs (SHALL)",
                status="failed" if missing else "passed",
                detail=f"{rtype}: missing {', '.join(missing)}"
                if missing
                else f"{rtype}: all needed interactions declared",
            )
            if optional:
                self.report.add(
                    f"metadata.{rtype}.optional",
                    f"{rtype}: optional (MAY)",
                    required=False,
                    status="failed",
                    detail=f"{rtype}: optional, not declared: {', '.join(optional)}",
                )

    def _formats(self, statement: dict[str, Any]) -> None:
        """Homeward sends and reads FHIR JSON: the server must list it (R4 allows the mime type or plain `json`)."""
        offered = {str(f).split(";")[0].strip() for f in statement.get("format", [])}
        wanted = self.requirements.get("format", ["application/fhir+json"])
        missing = [f for f in wanted if f not in offered and not (f.endswith("json") and "json" in offered)]
        self.report.add(
            "metadata.format",
            f"format {', '.join(wanted)}",
            status="failed" if missing else "passed",
            detail=f"format: {', '.join(missing)} not in CapabilityStatement.format ({', '.join(sorted(offered)) or 'none'})"
            if missing
            else "format: FHIR JSON declared",
        )

    def _security(self, rest: dict[str, Any]) -> None:
        """Where OAuth2 is configured, the server should say so in rest.security (SMART-on-FHIR or OAuth)."""
        title = "rest.security declares OAuth2 (where configured)"
        if not isinstance(self.client.auth, OAuth2ClientCredentials):
            self.report.add(
                "metadata.security",
                title,
                required=False,
                status="skipped",
                detail="no OAuth2 configured for this run (--token-url or a target's auth)",
            )
            return
        security = rest.get("security", {})
        codes = {c.get("code") for s in security.get("service", []) for c in s.get("coding", [])}
        declared = bool(codes & {"OAuth", "SMART-on-FHIR"})
        self.report.add(
            "metadata.security",
            title,
            required=False,
            status="passed" if declared else "failed",
            detail=f"security: {', '.join(sorted(c for c in codes if c))} declared"
            if declared
            else "security: no OAuth or SMART-on-FHIR in rest.security.service (the token worked; the statement does not say so)",
        )

    # -- the life cycle -----------------------------------------------------------------------------

    async def step(self, event: str, group: str) -> None:
        prefix = f"{group}.{event}"
        bundle = self.map(event, prefix)
        if bundle is None:
            self.report.add(f"{prefix}.deliver", f"{event} delivered", status="skipped", detail="no bundle to send")
            return
        sent = await self.deliver(event, bundle, f"{prefix}.deliver")
        if sent is not None:
            self.sent.append(sent)
            await self.read_back(sent, f"{prefix}.readback")

    def map(self, event: str, check_id: str) -> dict[str, Any] | None:
        title = f"{event} mapped by the site's mapping files"
        if self.mappings.messages.get(event) is None:
            self.report.add(
                f"{check_id}.map", title, status="failed", detail=f"mapping gap: no mappings/messages/ADT_{event}.yaml"
            )
            return None
        if self.mappings.site.events.get(event) != "process":
            self.report.add(
                f"{check_id}.map", title, status="failed", detail=f"mapping gap: site.yaml does not process {event}"
            )
            return None
        try:
            result = map_message(parse(test_messages(self.run_id)[event].encode()), self.mappings, self.tz)
        except InboundError as exc:
            self.report.add(
                f"{check_id}.map", title, status="failed", detail=f"{event} refused at {exc.location}: {exc.reason}"
            )
            return None
        self.report.add(f"{check_id}.map", title, detail=f"{event}: {result.resource_count} entries")
        return result.bundle

    async def deliver(self, event: str, bundle: dict[str, Any], check_id: str) -> Sent | None:
        item = OutboxItem(
            id=len(self.sent) + 1,
            inbound_id=0,
            target=self.target.name,
            ordering_key=f"{TEST_FACILITY}|{self.run_id}",
            bundle=orjson.dumps(bundle),
            attempts=0,
            created_at=time.time(),
            sending_facility=TEST_FACILITY,
            message_control_id=f"{TEST_FACILITY}-{self.run_id}-{event}",
            event=event,
        )
        try:
            detail = await self.target.send(item)
        except DeliveryError as exc:
            why = exc.reason + (f"; {exc.diagnostics}" if exc.diagnostics else "")
            self.report.add(check_id, f"{event} delivered as a {self.target.mode}", status="failed", detail=why)
            return None
        locations = [str(loc) for loc in detail.get("response", [])]
        self.created += [loc.split("/_history")[0] for loc in locations if loc]
        self.report.add(
            check_id,
            f"{event} delivered as a {self.target.mode}",
            detail=f"HTTP {detail.get('status')}, {len(bundle['entry'])} entries",
        )
        return Sent(event, bundle, locations)

    async def read_back(self, sent: Sent, check_id: str) -> None:
        """Each resource sent is found once by its identifier, with the status, identifiers and references sent."""
        problems: list[str] = []
        for entry in sent.bundle["entry"]:
            url = entry["request"]["url"]
            rtype = entry["resource"]["resourceType"]
            if "?" in url:
                response = await self.get(url)
                matches = (
                    [e["resource"] for e in response.json().get("entry", [])] if response.status_code == 200 else []
                )
                if response.status_code != 200:
                    problems.append(f"GET {rtype}?identifier: HTTP {response.status_code}")
                    continue
                if len(matches) != 1:
                    problems.append(f"{rtype}?identifier: {len(matches)} found, expected 1")
                    continue
                stored = matches[0]
                self.found[url] = f"{rtype}/{stored['id']}"
            else:
                response = await self.get(url)
                if response.status_code != 200:
                    problems.append(f"GET {url.split('/')[0]}/{{id}}: HTTP {response.status_code}")
                    continue
                stored = response.json()
                self.found[url] = url
            problems += await self._compare(entry["resource"], stored)
        self.report.add(
            check_id,
            f"{sent.event}: resources read back by identifier (one each; status, identifiers, references)",
            status="failed" if problems else "passed",
            detail="; ".join(problems[:6]) if problems else f"{len(sent.bundle['entry'])} resources as sent",
        )

    async def _compare(self, sent: dict[str, Any], stored: dict[str, Any]) -> list[str]:
        rtype = sent["resourceType"]
        problems = []
        if "status" in sent and stored.get("status") != sent["status"]:
            problems.append(f"{rtype}.status is {stored.get('status')!r}, sent {sent['status']!r}")
        stored_ids = {(i.get("system"), i.get("value")) for i in stored.get("identifier", [])}
        lost = [
            i.get("system") for i in sent.get("identifier", []) if (i.get("system"), i.get("value")) not in stored_ids
        ]
        if lost:
            problems.append(f"{rtype}.identifier lost: {', '.join(str(s) for s in lost)}")
        for path, ref in _references(stored, rtype):
            if ref.count("/") != 1 or ref.startswith(("urn:", "http")):
                problems.append(f"{path}: {ref.split(':')[0]} reference not resolved to Type/id")
                continue
            if (await self.get(ref)).status_code != 200:
                problems.append(f"{path}: {ref.split('/')[0]}/{{id}} cannot be read")
        return problems

    async def replay(self) -> None:
        """Send the life cycle's bundles again (a resend after a lost ACK): nothing may be created twice."""
        before = dict(self.found)
        if not self.sent:
            self.report.add(
                "replay.deliver", "the life cycle sent again", status="skipped", detail="nothing was delivered"
            )
            self.report.add(
                "replay.no-duplicates", "no duplicates after the replay", status="skipped", detail="nothing to compare"
            )
            return
        failed = []
        for sent in list(self.sent):
            again = await self.deliver(sent.event, sent.bundle, f"replay.{sent.event}.deliver")
            if again is None:
                failed.append(sent.event)
        problems = []
        for url, ref in before.items():
            if "?" not in url:
                continue
            response = await self.get(url)
            ids = [f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in response.json().get("entry", [])]
            if ids != [ref]:
                problems.append(
                    f"{url.split('?')[0]}?identifier: {len(ids)} found" + ("" if len(ids) != 1 else ", a new id")
                )
        self.report.add(
            "replay.no-duplicates",
            "no duplicates after the replay (conditional update by identifier)",
            status="failed" if problems or failed else "passed",
            detail="; ".join(problems[:6])
            or (f"replay not delivered: {', '.join(failed)}" if failed else f"{len(before)} resources, one each"),
        )

    async def merge_links(self) -> None:
        a40 = next((s for s in self.sent if s.event == "A40"), None)
        if a40 is None:
            self.report.add("merge.links", "Patient links after A40", status="skipped", detail="A40 was not delivered")
            return
        patients = [e for e in a40.bundle["entry"] if e["resource"]["resourceType"] == "Patient"]
        problems = []
        for entry in patients:
            ref = self.found.get(entry["request"]["url"])
            if ref is None:
                problems.append("a Patient of the merge was not found")
                continue
            stored = (await self.get(ref)).json()
            for link in entry["resource"].get("link", []):
                other_url = _entry_url(a40.bundle, link["other"].get("reference", ""))
                other = self.found.get(other_url, "")
                # batch and conditional modes send the link as a logical reference (by identifier)
                logical = identifier_of(other_url)
                if not any(
                    li.get("type") == link["type"]
                    and (
                        li.get("other", {}).get("reference") == other
                        or (logical is not None and li.get("other", {}).get("identifier") == logical)
                    )
                    for li in stored.get("link", [])
                ):
                    problems.append(f"Patient.link {link['type']} missing or not pointing at the other record")
        self.report.add(
            "merge.links",
            "A40: survivor replaces the prior record, prior is replaced-by the survivor",
            status="failed" if problems or not patients else "passed",
            detail="; ".join(problems) if problems else f"{len(patients)} Patient records linked",
        )

    # -- $validate and clean-up -----------------------------------------------------------------------

    def _offers(self, name: str, rtype: str) -> bool:
        if self.statement is None:
            return False
        for rest in self.statement.get("rest", []):
            if any(o.get("name") == name for o in rest.get("operation", [])):
                return True
            for resource in rest.get("resource", []):
                if resource.get("type") == rtype and any(o.get("name") == name for o in resource.get("operation", [])):
                    return True
        return False

    def _offers_interaction(self, code: str, rtype: str) -> bool:
        if self.statement is None:
            return False
        return any(
            r.get("type") == rtype and any(i.get("code") == code for i in r.get("interaction", []))
            for rest in self.statement.get("rest", [])
            for r in rest.get("resource", [])
        )

    async def validate(self) -> None:
        if self.load_profiles:
            await self._load_profiles()
        # Homeward's own profiles (validate.<type>), then every profile the sent resources claim in
        # meta.profile (validate.<profile name>, e.g. UK Core): a claim is only made where the content meets it.
        checks = [(f"validate.{rtype}", rtype, profile) for rtype, profile in PROFILES.items()]
        claimed: dict[str, str] = {}
        for sent in self.sent:
            for entry in sent.bundle["entry"]:
                for url in entry["resource"].get("meta", {}).get("profile", []):
                    claimed.setdefault(str(url), entry["resource"]["resourceType"])
        checks += [(f"validate.{url.rsplit('/', 1)[-1]}", rtype, url) for url, rtype in sorted(claimed.items())]
        for check_id, rtype, profile in checks:
            title = f"$validate {rtype} against {profile.rsplit('/', 1)[-1]}"
            refs = [ref for url, ref in self.found.items() if ref.startswith(f"{rtype}/")]
            if not refs:
                self.report.add(check_id, title, required=False, status="skipped", detail=f"no {rtype} was written")
                continue
            if not self._offers("validate", rtype):
                self.report.add(
                    check_id,
                    title,
                    required=False,
                    status="skipped",
                    detail=f"server does not declare $validate for {rtype}",
                )
                continue
            known = await self.get(f"StructureDefinition?url={quote(profile, safe=':/')}")
            if known.status_code != 200 or not known.json().get("entry"):
                self.report.add(
                    check_id,
                    title,
                    required=False,
                    status="skipped",
                    detail="the server does not hold the profile (load conformance/StructureDefinition-*.json and "
                    "conformance/ukcore/, or --load-profiles)",
                )
                continue
            problems = []
            for ref in sorted(set(refs)):
                resource = (await self.get(ref)).json()
                params = {
                    "resourceType": "Parameters",
                    "parameter": [{"name": "resource", "resource": resource}, {"name": "profile", "valueUri": profile}],
                }
                response = await self.client.post(
                    f"{self.base}/{rtype}/$validate",
                    content=orjson.dumps(params),
                    headers={"Content-Type": "application/fhir+json"},
                )
                body = response.json() if response.content else {}
                issues = [i for i in body.get("issue", []) if i.get("severity") in ("error", "fatal")]
                if response.status_code >= 400 and not issues:
                    problems.append(f"HTTP {response.status_code}")
                for issue in issues:
                    where = ", ".join(issue.get("expression", []) or issue.get("location", []))
                    text = issue.get("diagnostics") or issue.get("details", {}).get("text", issue.get("code", ""))
                    problems.append(f"{where}: {text}" if where else str(text))
            self.report.add(
                check_id,
                title,
                status="failed" if problems else "passed",
                detail="; ".join(problems[:6]) if problems else f"{len(set(refs))} {rtype} valid against the profile",
            )

    async def _load_profiles(self) -> None:
        problems = []
        for sd in self.profiles:
            response = await self.client.put(
                f"{self.base}/StructureDefinition/{sd['id']}",
                content=orjson.dumps(sd),
                headers={"Content-Type": "application/fhir+json"},
            )
            if response.status_code not in (200, 201):
                problems.append(f"StructureDefinition/{sd['id']}: HTTP {response.status_code}")
        self.report.add(
            "validate.load-profiles",
            "Homeward's profiles loaded on the server (--load-profiles)",
            required=False,
            status="failed" if problems else "passed",
            detail="; ".join(problems) if problems else f"{len(self.profiles)} StructureDefinitions",
        )

    async def cleanup(self) -> None:
        targets = list(dict.fromkeys(self.created + [r for r in self.found.values()]))
        if self.keep:
            self.report.add(
                "cleanup", "test resources deleted", required=False, status="skipped", detail="--keep given"
            )
            return
        if not targets:
            self.report.add(
                "cleanup", "test resources deleted", required=False, status="skipped", detail="nothing created"
            )
            return
        deleted, refused, kept = 0, [], 0
        for ref in reversed(targets):
            rtype = ref.split("/")[0]
            if self.statement is not None and not self._offers_interaction("delete", rtype):
                kept += 1
                continue
            response = await self.client.delete(f"{self.base}/{ref}")
            if response.status_code in (200, 202, 204, 404, 410):
                deleted += 1
            else:
                refused.append(f"{rtype}: HTTP {response.status_code}")
        detail = f"{deleted} deleted" + (f", {kept} kept (delete not declared)" if kept else "")
        self.report.add(
            "cleanup",
            "test resources deleted where the server allows delete",
            required=False,
            status="failed" if refused else "passed",
            detail=detail + (f"; refused: {', '.join(refused[:5])}" if refused else ""),
        )


def _expectation(item: dict[str, Any]) -> str:
    return next(
        (e.get("valueCode", "SHALL") for e in item.get("extension", []) if e.get("url") == EXPECTATION), "SHALL"
    )


def _resource_gaps(wanted: dict[str, Any], have: dict[str, Any]) -> tuple[list[str], list[str]]:
    """What the server does not declare for a resource type: (SHALL items, MAY/SHOULD items)."""
    if not have:
        return ["the resource type itself"], []
    missing: list[str] = []
    optional: list[str] = []
    interactions = {i.get("code") for i in have.get("interaction", [])}
    for item in wanted.get("interaction", []):
        if item["code"] not in interactions:
            (missing if _expectation(item) == "SHALL" else optional).append(item["code"])
    if wanted.get("conditionalUpdate") and not have.get("conditionalUpdate"):
        missing.append("conditionalUpdate")
    if wanted.get("updateCreate") and not have.get("updateCreate", True):
        missing.append("updateCreate")
    params = {p.get("name") for p in have.get("searchParam", [])}
    for param in wanted.get("searchParam", []):
        if param["name"] not in params and param["name"] != "_id":
            missing.append(f"search by {param['name']}")
    operations = {o.get("name") for o in have.get("operation", [])}
    for op in wanted.get("operation", []):
        if op["name"] not in operations:
            optional.append(f"${op['name']}")
    return missing, optional


def _references(node: Any, path: str) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "reference" and isinstance(value, str):
                found.append((path, value))
            elif key not in ("contained",):
                found += _references(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += _references(value, f"{path}[{i}]")
    return found


def _entry_url(bundle: dict[str, Any], full_url: str) -> str:
    """The request URL of the entry whose fullUrl is `full_url` (how the suite knows it on the server)."""
    return next((e["request"]["url"] for e in bundle["entry"] if e["fullUrl"] == full_url), "")


def load_requirements(conformance_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    folder = Path(conformance_dir)
    requirements = json.loads((folder / "CapabilityStatement-homeward-target-requirements.json").read_text("utf-8"))
    profiles = [json.loads(p.read_text("utf-8")) for p in sorted(folder.glob("StructureDefinition-*.json"))]
    # The UK Core profiles Homeward claims, with snapshots (UK Core publishes differentials only).
    profiles += [
        json.loads(p.read_text("utf-8")) for p in sorted((folder / UKCORE_FOLDER).glob("StructureDefinition-*.json"))
    ]
    return requirements, profiles
