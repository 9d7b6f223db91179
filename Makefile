# Convenience targets; dev.sh is the entry point (it needs no make on a fresh machine).
.PHONY: setup up test lint bench schemas
setup:
	./dev.sh setup
up:
	./dev.sh up
test:
	./dev.sh test
lint:
	.venv/bin/ruff check . && .venv/bin/mypy
schemas:
	.venv/bin/python -m schemas.export && .venv/bin/python -m sair.asyncapi
bench:
	.venv/bin/python bench/bus_roundtrip.py
