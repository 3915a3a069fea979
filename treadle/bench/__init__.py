"""`treadle bench …`: benchmarks that time treadle against a baseline in the same run and print the ratio.

The runner lives in `treadle.bench.runner` (it imports torch); this package stays light so the CLI can read
the list of benchmarks from `treadle.bench.registry` without loading torch.
"""
