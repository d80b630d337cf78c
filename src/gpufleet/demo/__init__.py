"""``gpufleet demo``: the main jobs end to end on embedded local services. See :mod:`gpufleet.demo.run`."""

from gpufleet.demo.run import run_demo

__all__ = ["run_demo"]
