"""Agent workers: consume assignments, call the agent's LLM, record one Trajectory per attempt.

:mod:`.service` is the worker process behind ``stormline worker``.
"""
