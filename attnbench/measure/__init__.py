"""Measures: each file answers one question about a case (FLOPs, parameters, latency, memory)."""
