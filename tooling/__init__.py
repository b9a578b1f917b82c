"""What is not the runtime: the load generator, the pool launcher, the baselines, and the
engine of `pool bench` and `pool demo`.

  tooling.loadgen   producers speaking protocol v1 on raw DEALER sockets: processes for
                    `pool bench`, a thread for the tests
  tooling.launch    `pool serve` as a child process (the demo, bench --spawn, the tests)
  tooling.baseline  the seed's loop and an in-process batched loop, for `bench --baseline`
  tooling.bench     `pool bench`'s engine: the load, the rotation and soak watches, the report,
                    the plot (cli/bench.py only displays)
  tooling.demo      `pool demo`'s engine (cli/demo.py only displays)
  tooling.pairs_stats  the figures of docs/quality-data.md from a labelled pairs file

A producer or the server never imports from here.
"""
