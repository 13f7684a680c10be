"""Ready-made glue between sticky_server and popular servers (each an optional extra)."""
