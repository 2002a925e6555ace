"""Running methods: in-process simulation, services, checkpoints."""
