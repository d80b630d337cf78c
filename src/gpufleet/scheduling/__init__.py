"""Where and on what a task runs: GPU models (:mod:`~gpufleet.scheduling.gpumodels`), pools and overflow
(:mod:`~gpufleet.scheduling.placement`), function versions and aliases (:mod:`~gpufleet.scheduling.versions`,
:mod:`~gpufleet.scheduling.aliases`), and how many GPU hosts the fleet needs (:mod:`~gpufleet.scheduling.scaling`)."""
