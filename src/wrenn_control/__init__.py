"""Control plane: the Wrenn REST API, auth, database, lifecycle and reaper."""
