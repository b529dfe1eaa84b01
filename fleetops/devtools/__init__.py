"""Local tooling behind ./scripts/demo and ./scripts/test. Runs before Django is configured."""
