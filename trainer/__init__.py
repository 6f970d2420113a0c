"""trainer/: the learning half of the loop.

Owns the experience join (trajectories + rewards -> :class:`trainer.join.Experience`, with
durable state in :mod:`trainer.state`), the neural router policy and its verified loader
(:mod:`trainer.policy`, ``load_checkpoint``), distributed updates on Ray Train + torch DDP
(:mod:`trainer.distributed`), versioned checkpoints and the promotion gate
(:mod:`trainer.checkpoints`), the live service behind ``stormline trainer``
(:mod:`trainer.service`) and ``stormline replay`` (:mod:`trainer.replay`).
"""
