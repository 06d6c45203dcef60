"""Edge and serving runtime: verify and run releases without torch."""
