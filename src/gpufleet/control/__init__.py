"""The control plane: invoke, inspect, cancel and retry tasks (:mod:`~gpufleet.control.plane`), and redrive dead
letters (:mod:`~gpufleet.control.redrive`). The HTTP API and the CLI are its two faces."""
