"""HL7 v2: the parsed message model, the parsing seam and ACK building."""
