"""producers/: what clients put on the log.

* :mod:`producers.publish` - tasks from JSONL or Python objects -> validated TaskSubmitted
  events on ``tasks`` (``stormline publish``; :func:`stormline.producers.publish.publish_tasks`).
* :mod:`stormline.producers.feedback` - human feedback -> Reward events on ``rewards``
  (``stormline reward``; :func:`stormline.producers.feedback.record_reward`).
"""
