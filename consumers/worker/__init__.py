"""Agent workers: consume assignments, call the agent's LLM, record one Trajectory per attempt.

* :mod:`.service`: the worker process behind ``stormline worker`` (consume loop, rebalances,
  commits, shutdown); :class:`~.service.Worker`, :func:`~.service.run_worker`.
* :mod:`.pipeline`: one assignment, stage by stage (idempotency -> cache -> rate limit ->
  call with retry and breaker -> fallback -> record -> deliver).
* :mod:`.stages`: the stages, one job each.
* :mod:`.providers`: provider clients, breakers and the agents' fallback chains.
* :mod:`.trajectories`: the Trajectory of an attempt, its id, its delivery to Kafka.
* :mod:`.heartbeats`: AgentHeartbeat events.
* :mod:`.stats`: the counters.

Redis is reached only through :mod:`stormline.state`: :class:`~stormline.state.HotPath` carries
the calls every task makes in one event-loop tick as one pipelined call, and falls back to
:class:`~stormline.state.RedisState`'s own methods when that call fails.
"""
