"""A module whose import fails, as a user's app with a bug would (for the command-line tests)."""

raise RuntimeError("boom in the user's module")
