"""The runtime kernel: what every Stormline process stands on to talk to Kafka.

One connection config that yields the confluent-kafka and the aiokafka/Faust client settings
(security included), producer, consumer with one commit discipline, admin, dead letters, and
the one retry policy (:mod:`.retry`). It imports nothing of Stormline's but the settings and
the logs.
"""
