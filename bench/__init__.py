"""spendgate's benchmark: a fake upstream, a floor proxy, a load generator, one runner.

Run it all with ``python -m bench.run`` (``--quick`` for a tiny load); see bench/README.md.
"""
