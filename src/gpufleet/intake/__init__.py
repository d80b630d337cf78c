"""From an event to a task: what an event may hold (:mod:`~gpufleet.intake.events`), who may name which task id
(:mod:`~gpufleet.intake.ids`), and the one path every producer takes (:mod:`~gpufleet.intake.path`)."""
