-- Let the ClickHouse server pull the Stormline topics itself (instead of `stormline sink`).
--
-- GENERATED from schemas/avro by consumers/sink/tables.py; do not edit. Regenerate with
--   python -m stormline.consumers.sink.tables --ddl --kafka-engine \
--     > deploy/clickhouse/kafka_engine.sql
--
-- Apply AFTER schema.sql, in the same database:
--   clickhouse-client --database stormline --multiquery < deploy/clickhouse/kafka_engine.sql
-- Before applying, replace (e.g. with sed):
--   kafka:9092                                     your bootstrap servers
--   http://schema-registry:8081/apis/ccompat/v7    your Confluent-compatible registry
--   the topic names, if you use STORMLINE_TOPIC_PREFIX (e.g. 'prod.tasks')
-- Values are Confluent-framed Avro (magic byte, schema id, body): format AvroConfluent.
-- Each kafka_* queue table mirrors its Avro schema (records as named Tuples); materialized
-- views write the same tables, columns and rows as the sink, so the canned analytics run
-- unchanged. Origin columns come from the Kafka engine's virtual columns (_topic,
-- _partition, _offset, _timestamp_ms, _key). Source columns are qualified with the queue
-- table's name, so an origin alias (partition, offset) never shadows an event field.
-- Delivery is at least once; ReplacingMergeTree over (..., event_id) collapses redelivered
-- and re-sent events on merge (query with FINAL, or SETTINGS final = 1, for exact counts).
-- Do not run `stormline sink` against the same tables at the same time.

CREATE TABLE IF NOT EXISTS kafka_tasks
(
    `event_id` UUID,
    `occurred_at` DateTime64(3, 'UTC'),
    `schema_version` Int32,
    `task_id` String,
    `tenant` String,
    `task_type` String,
    `prompt` String,
    `priority` Int32,
    `required_capabilities` Array(String),
    `expected` Nullable(String),
    `evaluator` Nullable(String),
    `deadline_ms` Nullable(Int64),
    `metadata` Map(String, String)
)
ENGINE = Kafka
SETTINGS kafka_broker_list = 'kafka:9092', kafka_topic_list = 'tasks',
         kafka_group_name = 'clickhouse-stormline', kafka_format = 'AvroConfluent',
         format_avro_schema_registry_url = 'http://schema-registry:8081/apis/ccompat/v7',
         kafka_num_consumers = 1, kafka_skip_broken_messages = 100;

CREATE MATERIALIZED VIEW IF NOT EXISTS mv_tasks TO tasks AS
SELECT _topic AS topic,
       toInt32(_partition) AS partition,
       toInt64(_offset) AS offset,
       ifNull(toDateTime64(_timestamp_ms, 3, 'UTC'), toDateTime64(0, 3, 'UTC')) AS ts,
       _key AS key,
       toString(kafka_tasks.event_id) AS event_id,
       occurred_at,
       schema_version,
       task_id,
       tenant,
       task_type,
       prompt,
       priority,
       required_capabilities,
       ifNull(kafka_tasks.expected, '') AS expected,
       ifNull(kafka_tasks.evaluator, '') AS evaluator,
       ifNull(kafka_tasks.deadline_ms, 0) AS deadline_ms,
       metadata
FROM kafka_tasks;

CREATE TABLE IF NOT EXISTS kafka_assignments
(
    `event_id` UUID,
    `occurred_at` DateTime64(3, 'UTC'),
    `schema_version` Int32,
    `task_id` String,
    `attempt` Int32,
    `agent_id` String,
    `policy` String,
    `strategy` String,
    `policy_version` Nullable(String),
    `score` Float64,
    `epsilon` Nullable(Float64),
    `assigned_at` DateTime64(3, 'UTC'),
    `expires_at` DateTime64(3, 'UTC'),
    `task` Tuple(occurred_at DateTime64(3, 'UTC'), task_id String, tenant String, task_type String, prompt String, priority Int32, required_capabilities Array(String), expected Nullable(String), evaluator Nullable(String), deadline_ms Nullable(Int64), metadata Map(String, String))
)
ENGINE = Kafka
SETTINGS kafka_broker_list = 'kafka:9092', kafka_topic_list = 'assignments',
         kafka_group_name = 'clickhouse-stormline', kafka_format = 'AvroConfluent',
         format_avro_schema_registry_url = 'http://schema-registry:8081/apis/ccompat/v7',
         kafka_num_consumers = 1, kafka_skip_broken_messages = 100;

CREATE MATERIALIZED VIEW IF NOT EXISTS mv_assignments TO assignments AS
SELECT _topic AS topic,
       toInt32(_partition) AS partition,
       toInt64(_offset) AS offset,
       ifNull(toDateTime64(_timestamp_ms, 3, 'UTC'), toDateTime64(0, 3, 'UTC')) AS ts,
       _key AS key,
       toString(kafka_assignments.event_id) AS event_id,
       occurred_at,
       schema_version,
       task_id,
       attempt,
       agent_id,
       policy,
       strategy,
       ifNull(kafka_assignments.policy_version, '') AS policy_version,
       score,
       epsilon,
       assigned_at,
       expires_at,
       tupleElement(kafka_assignments.task, 'tenant') AS tenant,
       tupleElement(kafka_assignments.task, 'task_type') AS task_type,
       tupleElement(kafka_assignments.task, 'priority') AS priority
FROM kafka_assignments;

CREATE TABLE IF NOT EXISTS kafka_trajectories
(
    `event_id` UUID,
    `occurred_at` DateTime64(3, 'UTC'),
    `schema_version` Int32,
    `task_id` String,
    `trajectory_id` String,
    `attempt` Int32,
    `agent_id` String,
    `task_type` String,
    `provider` String,
    `model` String,
    `policy_version` Nullable(String),
    `steps` Array(Tuple(role String, content String, tool_calls Array(Tuple(id String, name String, arguments String)), prompt_tokens Int32, completion_tokens Int32, latency_ms Float64, token_ids Array(Int32), logprobs Array(Float64))),
    `output` Nullable(String),
    `status` String,
    `error` Nullable(String),
    `usage` Tuple(prompt_tokens Int32, completion_tokens Int32, cost_usd Float64),
    `latency_ms` Float64,
    `expected` Nullable(String),
    `evaluator` Nullable(String),
    `final` Bool
)
ENGINE = Kafka
SETTINGS kafka_broker_list = 'kafka:9092', kafka_topic_list = 'trajectories',
         kafka_group_name = 'clickhouse-stormline', kafka_format = 'AvroConfluent',
         format_avro_schema_registry_url = 'http://schema-registry:8081/apis/ccompat/v7',
         kafka_num_consumers = 1, kafka_skip_broken_messages = 100;

CREATE MATERIALIZED VIEW IF NOT EXISTS mv_trajectories TO trajectories AS
SELECT _topic AS topic,
       toInt32(_partition) AS partition,
       toInt64(_offset) AS offset,
       ifNull(toDateTime64(_timestamp_ms, 3, 'UTC'), toDateTime64(0, 3, 'UTC')) AS ts,
       _key AS key,
       toString(kafka_trajectories.event_id) AS event_id,
       occurred_at,
       schema_version,
       task_id,
       trajectory_id,
       attempt,
       agent_id,
       task_type,
       provider,
       model,
       ifNull(kafka_trajectories.policy_version, '') AS policy_version,
       toInt32(length(kafka_trajectories.steps)) AS n_steps,
       ifNull(kafka_trajectories.output, '') AS output,
       status,
       ifNull(kafka_trajectories.error, '') AS error,
       toInt64(tupleElement(kafka_trajectories.usage, 'prompt_tokens')) AS prompt_tokens,
       toInt64(tupleElement(kafka_trajectories.usage, 'completion_tokens')) AS completion_tokens,
       toInt64(tupleElement(kafka_trajectories.usage, 'prompt_tokens') + tupleElement(kafka_trajectories.usage, 'completion_tokens')) AS total_tokens,
       tupleElement(kafka_trajectories.usage, 'cost_usd') AS cost_usd,
       latency_ms,
       ifNull(kafka_trajectories.evaluator, '') AS evaluator,
       final
FROM kafka_trajectories;

CREATE MATERIALIZED VIEW IF NOT EXISTS mv_steps TO steps AS
SELECT _topic AS topic,
       toInt32(_partition) AS partition,
       toInt64(_offset) AS offset,
       ifNull(toDateTime64(_timestamp_ms, 3, 'UTC'), toDateTime64(0, 3, 'UTC')) AS ts,
       _key AS key,
       toString(kafka_trajectories.event_id) AS event_id,
       occurred_at,
       schema_version,
       task_id,
       trajectory_id,
       agent_id,
       toInt32(item_number - 1) AS step_index,
       tupleElement(item, 'role') AS role,
       tupleElement(item, 'content') AS content,
       arrayMap(x -> tupleElement(x, 'name'), tupleElement(item, 'tool_calls')) AS tool_names,
       toInt64(tupleElement(item, 'prompt_tokens')) AS prompt_tokens,
       toInt64(tupleElement(item, 'completion_tokens')) AS completion_tokens,
       tupleElement(item, 'latency_ms') AS latency_ms,
       toInt32(length(ifNull(tupleElement(item, 'token_ids'), []))) AS n_token_ids
FROM kafka_trajectories
ARRAY JOIN kafka_trajectories.steps AS item, arrayEnumerate(kafka_trajectories.steps) AS item_number;

CREATE TABLE IF NOT EXISTS kafka_rewards
(
    `event_id` UUID,
    `occurred_at` DateTime64(3, 'UTC'),
    `schema_version` Int32,
    `task_id` String,
    `trajectory_id` String,
    `attempt` Int32,
    `agent_id` String,
    `task_type` String,
    `policy_version` Nullable(String),
    `value` Float64,
    `components` Map(String, Float64),
    `source` String,
    `reason` Nullable(String)
)
ENGINE = Kafka
SETTINGS kafka_broker_list = 'kafka:9092', kafka_topic_list = 'rewards',
         kafka_group_name = 'clickhouse-stormline', kafka_format = 'AvroConfluent',
         format_avro_schema_registry_url = 'http://schema-registry:8081/apis/ccompat/v7',
         kafka_num_consumers = 1, kafka_skip_broken_messages = 100;

CREATE MATERIALIZED VIEW IF NOT EXISTS mv_rewards TO rewards AS
SELECT _topic AS topic,
       toInt32(_partition) AS partition,
       toInt64(_offset) AS offset,
       ifNull(toDateTime64(_timestamp_ms, 3, 'UTC'), toDateTime64(0, 3, 'UTC')) AS ts,
       _key AS key,
       toString(kafka_rewards.event_id) AS event_id,
       occurred_at,
       schema_version,
       task_id,
       trajectory_id,
       attempt,
       agent_id,
       task_type,
       ifNull(kafka_rewards.policy_version, '') AS policy_version,
       value,
       components,
       source,
       ifNull(kafka_rewards.reason, '') AS reason
FROM kafka_rewards;

CREATE TABLE IF NOT EXISTS kafka_heartbeats
(
    `event_id` UUID,
    `occurred_at` DateTime64(3, 'UTC'),
    `schema_version` Int32,
    `worker_id` String,
    `agent_ids` Array(String),
    `capabilities` Map(String, Array(String)),
    `in_flight` Int32,
    `processed` Int64,
    `errors` Int64,
    `status` String,
    `detail` Nullable(String)
)
ENGINE = Kafka
SETTINGS kafka_broker_list = 'kafka:9092', kafka_topic_list = 'heartbeats',
         kafka_group_name = 'clickhouse-stormline', kafka_format = 'AvroConfluent',
         format_avro_schema_registry_url = 'http://schema-registry:8081/apis/ccompat/v7',
         kafka_num_consumers = 1, kafka_skip_broken_messages = 100;

CREATE MATERIALIZED VIEW IF NOT EXISTS mv_heartbeats TO heartbeats AS
SELECT _topic AS topic,
       toInt32(_partition) AS partition,
       toInt64(_offset) AS offset,
       ifNull(toDateTime64(_timestamp_ms, 3, 'UTC'), toDateTime64(0, 3, 'UTC')) AS ts,
       _key AS key,
       toString(kafka_heartbeats.event_id) AS event_id,
       occurred_at,
       schema_version,
       worker_id,
       agent_ids,
       in_flight,
       processed,
       errors,
       status,
       ifNull(kafka_heartbeats.detail, '') AS detail
FROM kafka_heartbeats;

CREATE TABLE IF NOT EXISTS kafka_agent_health
(
    `event_id` UUID,
    `occurred_at` DateTime64(3, 'UTC'),
    `schema_version` Int32,
    `agent_id` String,
    `status` String,
    `previous` String,
    `reason` String
)
ENGINE = Kafka
SETTINGS kafka_broker_list = 'kafka:9092', kafka_topic_list = 'agent-health',
         kafka_group_name = 'clickhouse-stormline', kafka_format = 'AvroConfluent',
         format_avro_schema_registry_url = 'http://schema-registry:8081/apis/ccompat/v7',
         kafka_num_consumers = 1, kafka_skip_broken_messages = 100;

CREATE MATERIALIZED VIEW IF NOT EXISTS mv_agent_health TO agent_health AS
SELECT _topic AS topic,
       toInt32(_partition) AS partition,
       toInt64(_offset) AS offset,
       ifNull(toDateTime64(_timestamp_ms, 3, 'UTC'), toDateTime64(0, 3, 'UTC')) AS ts,
       _key AS key,
       toString(kafka_agent_health.event_id) AS event_id,
       occurred_at,
       schema_version,
       agent_id,
       status,
       previous,
       reason
FROM kafka_agent_health;

CREATE TABLE IF NOT EXISTS kafka_checkpoints
(
    `event_id` UUID,
    `occurred_at` DateTime64(3, 'UTC'),
    `schema_version` Int32,
    `policy` String,
    `version` Int32,
    `uri` String,
    `sha256` String,
    `metrics` Map(String, Float64),
    `trained_on` Array(Tuple(topic String, partition Int32, start_offset Int64, end_offset Int64)),
    `promoted` Bool,
    `decision` String
)
ENGINE = Kafka
SETTINGS kafka_broker_list = 'kafka:9092', kafka_topic_list = 'checkpoints',
         kafka_group_name = 'clickhouse-stormline', kafka_format = 'AvroConfluent',
         format_avro_schema_registry_url = 'http://schema-registry:8081/apis/ccompat/v7',
         kafka_num_consumers = 1, kafka_skip_broken_messages = 100;

CREATE MATERIALIZED VIEW IF NOT EXISTS mv_checkpoints TO checkpoints AS
SELECT _topic AS topic,
       toInt32(_partition) AS partition,
       toInt64(_offset) AS offset,
       ifNull(toDateTime64(_timestamp_ms, 3, 'UTC'), toDateTime64(0, 3, 'UTC')) AS ts,
       _key AS key,
       toString(kafka_checkpoints.event_id) AS event_id,
       occurred_at,
       schema_version,
       policy,
       version,
       concat(kafka_checkpoints.policy, '@', toString(kafka_checkpoints.version)) AS policy_version,
       uri,
       sha256,
       metrics,
       toJSONString(kafka_checkpoints.trained_on) AS trained_on,
       promoted,
       decision
FROM kafka_checkpoints;

CREATE TABLE IF NOT EXISTS kafka_dead_letters
(
    `event_id` UUID,
    `occurred_at` DateTime64(3, 'UTC'),
    `schema_version` Int32,
    `source_topic` String,
    `partition` Int32,
    `offset` Int64,
    `raw_key` Nullable(String),
    `raw_value` Nullable(String),
    `error_kind` String,
    `error` String,
    `consumer_group` String
)
ENGINE = Kafka
SETTINGS kafka_broker_list = 'kafka:9092', kafka_topic_list = 'dead-letters',
         kafka_group_name = 'clickhouse-stormline', kafka_format = 'AvroConfluent',
         format_avro_schema_registry_url = 'http://schema-registry:8081/apis/ccompat/v7',
         kafka_num_consumers = 1, kafka_skip_broken_messages = 100;

CREATE MATERIALIZED VIEW IF NOT EXISTS mv_dead_letters TO dead_letters AS
SELECT _topic AS topic,
       toInt32(_partition) AS partition,
       toInt64(_offset) AS offset,
       ifNull(toDateTime64(_timestamp_ms, 3, 'UTC'), toDateTime64(0, 3, 'UTC')) AS ts,
       _key AS key,
       toString(kafka_dead_letters.event_id) AS event_id,
       occurred_at,
       schema_version,
       source_topic,
       kafka_dead_letters.partition AS source_partition,
       kafka_dead_letters.offset AS source_offset,
       toValidUTF8(ifNull(kafka_dead_letters.raw_key, '')) AS raw_key,
       toInt64(length(ifNull(kafka_dead_letters.raw_value, ''))) AS raw_value_bytes,
       error_kind,
       error,
       consumer_group
FROM kafka_dead_letters;
