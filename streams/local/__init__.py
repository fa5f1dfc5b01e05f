"""The local stack and everything that drives the whole system on it: the process supervisor, the stack, the demo, the benchmarks, and the harness the tests use too."""
