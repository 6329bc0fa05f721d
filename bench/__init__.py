"""The harness: CLI, run plan, episode loop, records, reports and analysis."""

__version__ = "0.1.0"
