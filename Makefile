# Common tasks. `make test` is what CI runs (after `pip install -e ".[test]"`).
PY ?= python

.PHONY: install test test-gpu bench bench-gpu lint cpp-test

install:
	pip install -e ".[test]"

test:
	$(PY) -m pytest -q

test-gpu:  # on a CUDA machine, after `pip install --no-build-isolation -e .`
	$(PY) -m pytest -q -m gpu tests

bench:
	$(PY) -m pytest benchmarks/ --benchmark-only

bench-gpu:
	STP_BENCH_MD=benchmarks/results-gpu.md $(PY) -m pytest benchmarks/ --benchmark-only

cpp-test:
	cmake -S . -B build -G Ninja && cmake --build build && ctest --test-dir build --output-on-failure -LE gpu

lint:
	ruff check stp stp_kernels tests benchmarks setup.py
