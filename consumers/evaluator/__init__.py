"""Reward evaluators: :mod:`.rules` scores one trajectory (pure verifiers and the judge);
:mod:`.service` is the ``stormline evaluator`` process that turns trajectories into Rewards.
"""
