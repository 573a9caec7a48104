"""pgherd: a PostgreSQL proxy (pooler, load balancer, sharder)."""

__version__ = "0.1.0"
