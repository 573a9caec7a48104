"""Configuration: PgDog-compatible pgherd.toml / users.toml models and loading."""
