"""Measurement: the ``cost/*`` row of a run (parameters, time, memory, throughput)."""
