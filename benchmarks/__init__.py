"""``python -m benchmarks``: the benchmark of the README's speed section (`hf_comet.bench`, also ``hf-comet bench``)."""
