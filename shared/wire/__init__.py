"""PostgreSQL frontend/backend protocol v3, sans-IO."""
