"""A worker process: listener, client sessions, server connections, pools."""
