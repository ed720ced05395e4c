"""Conformance kit: Homeward's FHIR artefacts, the offline validator, and the live-server suite."""
