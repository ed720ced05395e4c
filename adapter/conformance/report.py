"""The conformance report: a console table, JUnit XML (for CI systems) and JSON, from one list of checks."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

Status = Literal["passed", "failed", "skipped"]


@dataclass
class Check:
    """One line of the report. `required` checks decide the exit code; a skipped check never counts as passed."""

    id: str
    title: str
    required: bool
    status: Status = "passed"
    detail: str = ""
    seconds: float = 0.0


@dataclass
class Report:
    server: str
    started: str
    checks: list[Check] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)

    def add(self, id: str, title: str, *, required: bool = True, status: Status = "passed", detail: str = "") -> Check:
        check = Check(id, title, required, status, detail)
        self.checks.append(check)
        return check

    @property
    def ok(self) -> bool:
        return all(c.status == "passed" for c in self.checks if c.required)

    def counts(self) -> dict[str, int]:
        counts = {"passed": 0, "failed": 0, "skipped": 0, "required_failed": 0}
        for c in self.checks:
            counts[c.status] += 1
            if c.required and c.status == "failed":
                counts["required_failed"] += 1
        return counts

    def table(self) -> str:
        """The console summary: one line per check, then the totals and the verdict."""
        marks = {"passed": "PASS", "failed": "FAIL", "skipped": "SKIP"}
        width = max((len(c.id) for c in self.checks), default=10)
        lines = [f"Homeward conformance against {self.server} ({self.started})", ""]
        lines.append(f"{'result':<6}  {'check':<{width}}  {'kind':<8}  detail")
        lines.append(f"{'-' * 6}  {'-' * width}  {'-' * 8}  {'-' * 40}")
        for c in self.checks:
            kind = "required" if c.required else "optional"
            lines.append(f"{marks[c.status]:<6}  {c.id:<{width}}  {kind:<8}  {c.detail or c.title}")
        n = self.counts()
        lines.append("")
        lines.append(
            f"{n['passed']} passed, {n['failed']} failed ({n['required_failed']} required), {n['skipped']} skipped: "
            + ("CONFORMANT" if self.ok else "NOT CONFORMANT")
        )
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "server": self.server,
            "started": self.started,
            "conformant": self.ok,
            "counts": self.counts(),
            "facts": self.facts,
            "checks": [asdict(c) for c in self.checks],
        }

    def junit(self) -> str:
        n = self.counts()
        suite = ET.Element(
            "testsuite",
            name="homeward-conformance",
            tests=str(len(self.checks)),
            failures=str(n["failed"]),
            skipped=str(n["skipped"]),
            errors="0",
            timestamp=self.started,
        )
        ET.SubElement(ET.SubElement(suite, "properties"), "property", name="server", value=self.server)
        for c in self.checks:
            case = ET.SubElement(
                suite, "testcase", classname=f"conformance.{c.id.split('.')[0]}", name=c.id, time=f"{c.seconds:.3f}"
            )
            if c.status == "failed":
                kind = "required" if c.required else "optional"
                ET.SubElement(case, "failure", message=c.detail, type=kind).text = f"{c.title}: {c.detail}"
            elif c.status == "skipped":
                ET.SubElement(case, "skipped", message=c.detail)
        suites = ET.Element("testsuites")
        suites.append(suite)
        return ET.tostring(suites, encoding="unicode", xml_declaration=True) + "\n"

    def write(self, json_path: Path | None, junit_path: Path | None) -> None:
        if json_path is not None:
            json_path.write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")
        if junit_path is not None:
            junit_path.write_text(self.junit(), encoding="utf-8")
