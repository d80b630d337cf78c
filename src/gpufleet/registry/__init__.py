"""The task registry: every task's record, queue and index in Redis, changed only by atomic Lua scripts.

- :mod:`~gpufleet.registry.model`: what it stores and answers (states, a new task, a claim, a callback);
- :mod:`~gpufleet.registry.store`: the :class:`~gpufleet.registry.store.Registry`, one method per transition;
- :mod:`~gpufleet.registry.keyspace`: every key, the callback entry format, and the scripts (``scripts/*.lua``);
- :mod:`~gpufleet.registry.messages`: Celery's task messages, built in kombu's Redis envelope, and the queue names;
- :mod:`~gpufleet.registry.jobs`: sharded jobs' records;
- :mod:`~gpufleet.registry.snapshot`: the fleet as it is now, in one round trip;
- :mod:`~gpufleet.registry.connection`: connecting to Redis, standalone or under Sentinel.
"""
