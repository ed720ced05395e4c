"""Homeward: HL7 v2 ADT discharge messages in, FHIR R4 referrals and care plans out."""

__version__ = "0.1.0"
