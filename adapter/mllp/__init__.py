"""MLLP: framing (sans-IO), the asyncio listener and a small client."""
