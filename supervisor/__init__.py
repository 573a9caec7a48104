"""The pgherd command line and the supervisor process."""
