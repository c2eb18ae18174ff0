"""Stand-ins for hardware runtimes, shared by the tests (not tests themselves)."""
