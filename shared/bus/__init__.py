"""The supervisor <-> worker ZeroMQ bus."""
