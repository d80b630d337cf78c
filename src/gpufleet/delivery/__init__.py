"""What leaves the fleet: callback records (:mod:`~gpufleet.delivery.records`) and dead letters
(:mod:`~gpufleet.delivery.letters`), delivered by the dispatcher (:mod:`~gpufleet.delivery.dispatcher`) in one flow
per destination (:mod:`~gpufleet.delivery.flows`), parked when refused for good (:mod:`~gpufleet.delivery.parking`),
and read back from where they landed (:mod:`~gpufleet.delivery.readback`). The destinations themselves are
:mod:`gpufleet.destinations`."""
