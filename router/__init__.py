"""Understanding SQL and routing decisions; no I/O."""
