"""HL7 v2 -> FHIR mapping: mapping files loaded as data, run by a pure engine."""
