"""Between master and worker: the control socket's frames, receiving and sending them, message payloads."""
