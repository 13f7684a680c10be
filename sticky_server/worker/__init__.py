"""The worker's side: the session that takes hand-offs and frames, the two loops that drive it, its connections."""
