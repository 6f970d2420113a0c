"""trainer/: the learning half of the loop.

Owns the experience join (trajectories + rewards -> :class:`.join.Experience`, with durable
state in :mod:`.state`), the neural router policy (:mod:`.policy`), distributed updates on Ray
Train + torch DDP (:mod:`.distributed`), versioned checkpoints, their verified loader and the
promotion gate (:mod:`.checkpoints`), the live service behind ``stormline trainer``
(:mod:`.service`) and ``stormline replay`` (:mod:`.replay`).
"""
