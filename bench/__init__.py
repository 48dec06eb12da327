"""`make bench`, `make bench-mpnet` and `make load`: the benchmarks, their peers and the load test, beside the results
they write (bench/*.md). Not part of what serves requests: the image carries none of it, and nothing in `service/`
imports it. Its own dependencies are the `bench` extra (and `int8` for `python -m bench.int8`)."""
