"""Code shared by the supervisor, the workers and the router."""
