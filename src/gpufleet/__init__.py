"""gpufleet: a self-hosted, event-driven GPU worker fleet.

Importing this package does nothing but define names: no environment reads, no logging setup, no clients.
"""

from gpufleet.aws import ObjectEvent
from gpufleet.context import BatchContext, Context
from gpufleet.functions import Batch, Function, Gpu, function, job

__all__ = ["Batch", "BatchContext", "Context", "Function", "Gpu", "ObjectEvent", "function", "job"]
__version__ = "0.1.0"
