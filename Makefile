# Convenience aliases; the README's two commands are ./scripts/demo and ./scripts/test.
.PHONY: demo test
demo:
	./scripts/demo
test:
	./scripts/test

.PHONY: bench
bench:
	.venv/bin/python -m bench.b1_reconciler
	.venv/bin/python -m bench.b2_keys
	.venv/bin/python -m bench.b3_indexer
	.venv/bin/python -m bench.b5_reads
	.venv/bin/python -m bench.b5_console
	.venv/bin/python -m bench.b5_scale
	.venv/bin/python -m bench.b6_load
