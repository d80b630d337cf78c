"""Local development services (Redis, Kafka) run as child processes."""
