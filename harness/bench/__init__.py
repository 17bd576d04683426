"""Throughput benchmarks around `suites/bench`: results and gates (`results`), the pytest plugin
(`plugin`), the `bench` command (`run`) and the `report` command (`report`)."""
