"""The key re-stake lifecycle (seed 000): services, selectors, the re-stake schedule and the
verification loop, API, admin, dashboard card and metrics. Models live in
`migrations_app.models.keys`."""
