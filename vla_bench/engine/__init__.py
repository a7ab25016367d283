"""The closed-loop engine: one worker pool, one episode loop and one scheduler for every job of a session."""
