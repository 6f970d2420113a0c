-- Let the ClickHouse server pull the Stormline topics itself (instead of `stormline sink`).
--
-- Apply AFTER schema.sql, in the same database:
--   clickhouse-client --database stormline --multiquery < deploy/clickhouse/kafka_engine.sql
-- Before applying, replace (e.g. with sed):
--   kafka:9092                                     your bootstrap servers
--   http://schema-registry:8081/apis/ccompat/v7    your Confluent-compatible registry
--   the topic names, if you use STORMLINE_TOPIC_PREFIX (e.g. 'prod.tasks')
-- Values are Confluent-framed Avro (magic byte, schema id, body): format AvroConfluent.
-- Each kafka_* queue table is read by a materialized view that writes the same tables and
-- columns as the sink, so the canned analytics run unchanged. Origin columns come from the
-- Kafka engine's virtual columns (_topic, _partition, _offset, _timestamp_ms, _key).
-- Delivery is at least once; ReplacingMergeTree over (..., topic, partition, offset)
-- collapses redelivered rows on merge (query with FINAL where exact counts matter).
-- Do not run `stormline sink` against the same tables at the same time.
-- Nested Avro records map to named Tuples with every field of the record, in order.

CREATE TABLE IF NOT EXISTS kafka_tasks
(
    event_id UUID, occurred_at DateTime64(3, 'UTC'), schema_version Int32,
    task_id String, tenant String, task_type String, prompt String, priority Int32,
    required_capabilities Array(String), expected Nullable(String),
    evaluator Nullable(String), deadline_ms Nullable(Int64), metadata Map(String, String)
)
ENGINE = Kafka
SETTINGS kafka_broker_list = 'kafka:9092', kafka_topic_list = 'tasks',
         kafka_group_name = 'clickhouse-stormline', kafka_format = 'AvroConfluent',
         format_avro_schema_registry_url = 'http://schema-registry:8081/apis/ccompat/v7',
         kafka_num_consumers = 1, kafka_skip_broken_messages = 100;

CREATE MATERIALIZED VIEW IF NOT EXISTS mv_tasks TO tasks AS
SELECT _topic AS topic, toInt32(_partition) AS partition, toInt64(_offset) AS offset,
       fromUnixTimestamp64Milli(_timestamp_ms, 'UTC') AS ts, ifNull(_key, '') AS key,
       toString(event_id) AS event_id, occurred_at, schema_version,
       task_id, tenant, task_type, prompt, priority, required_capabilities,
       ifNull(expected, '') AS expected, ifNull(evaluator, '') AS evaluator,
       ifNull(deadline_ms, 0) AS deadline_ms, metadata
FROM kafka_tasks;

CREATE TABLE IF NOT EXISTS kafka_assignments
(
    event_id UUID, occurred_at DateTime64(3, 'UTC'), schema_version Int32,
    task_id String, attempt Int32, agent_id String, policy String, strategy String,
    policy_version Nullable(String), score Float64, epsilon Nullable(Float64),
    assigned_at DateTime64(3, 'UTC'), expires_at DateTime64(3, 'UTC'),
    task Tuple(occurred_at DateTime64(3, 'UTC'), task_id String, tenant String,
               task_type String, prompt String, priority Int32,
               required_capabilities Array(String), expected Nullable(String),
               evaluator Nullable(String), deadline_ms Nullable(Int64),
               metadata Map(String, String))
)
ENGINE = Kafka
SETTINGS kafka_broker_list = 'kafka:9092', kafka_topic_list = 'assignments',
         kafka_group_name = 'clickhouse-stormline', kafka_format = 'AvroConfluent',
         format_avro_schema_registry_url = 'http://schema-registry:8081/apis/ccompat/v7',
         kafka_num_consumers = 1, kafka_skip_broken_messages = 100;

CREATE MATERIALIZED VIEW IF NOT EXISTS mv_assignments TO assignments AS
SELECT _topic AS topic, toInt32(_partition) AS partition, toInt64(_offset) AS offset,
       fromUnixTimestamp64Milli(_timestamp_ms, 'UTC') AS ts, ifNull(_key, '') AS key,
       toString(event_id) AS event_id, occurred_at, schema_version,
       task_id, attempt, agent_id, policy, strategy,
       ifNull(policy_version, '') AS policy_version, score, epsilon, assigned_at, expires_at,
       task.tenant AS tenant, task.task_type AS task_type, task.priority AS priority
FROM kafka_assignments;

CREATE TABLE IF NOT EXISTS kafka_trajectories
(
    event_id UUID, occurred_at DateTime64(3, 'UTC'), schema_version Int32,
    task_id String, trajectory_id String, attempt Int32, agent_id String, task_type String,
    provider String, model String, policy_version Nullable(String),
    steps Array(Tuple(
        role String, content String,
        tool_calls Array(Tuple(id String, name String, arguments String)),
        prompt_tokens Int32, completion_tokens Int32, latency_ms Float64,
        token_ids Nullable(Array(Int32)), logprobs Nullable(Array(Float64)))),
    output Nullable(String), status String, error Nullable(String),
    usage Tuple(prompt_tokens Int32, completion_tokens Int32, cost_usd Float64),
    latency_ms Float64, evaluator Nullable(String), final Bool
)
ENGINE = Kafka
SETTINGS kafka_broker_list = 'kafka:9092', kafka_topic_list = 'trajectories',
         kafka_group_name = 'clickhouse-stormline', kafka_format = 'AvroConfluent',
         format_avro_schema_registry_url = 'http://schema-registry:8081/apis/ccompat/v7',
         kafka_num_consumers = 1, kafka_skip_broken_messages = 100;

CREATE MATERIALIZED VIEW IF NOT EXISTS mv_trajectories TO trajectories AS
SELECT _topic AS topic, toInt32(_partition) AS partition, toInt64(_offset) AS offset,
       fromUnixTimestamp64Milli(_timestamp_ms, 'UTC') AS ts, ifNull(_key, '') AS key,
       toString(event_id) AS event_id, occurred_at, schema_version,
       task_id, trajectory_id, attempt, agent_id, task_type, provider, model,
       ifNull(policy_version, '') AS policy_version, status, ifNull(error, '') AS error,
       ifNull(output, '') AS output, toInt32(length(steps)) AS n_steps,
       toInt64(usage.prompt_tokens) AS prompt_tokens,
       toInt64(usage.completion_tokens) AS completion_tokens,
       toInt64(usage.prompt_tokens + usage.completion_tokens) AS total_tokens,
       usage.cost_usd AS cost_usd, latency_ms, ifNull(evaluator, '') AS evaluator, final
FROM kafka_trajectories;

-- Steps flattened, one row per step (reads the same queue table as mv_trajectories).
CREATE MATERIALIZED VIEW IF NOT EXISTS mv_steps TO steps AS
SELECT _topic AS topic, toInt32(_partition) AS partition, toInt64(_offset) AS offset,
       fromUnixTimestamp64Milli(_timestamp_ms, 'UTC') AS ts, ifNull(_key, '') AS key,
       toString(event_id) AS event_id, occurred_at, schema_version,
       task_id, trajectory_id, agent_id, toInt32(step_index - 1) AS step_index,
       step.role AS role, step.content AS content,
       arrayMap(c -> c.name, step.tool_calls) AS tool_names,
       toInt64(step.prompt_tokens) AS prompt_tokens,
       toInt64(step.completion_tokens) AS completion_tokens,
       step.latency_ms AS latency_ms, toInt32(length(ifNull(step.token_ids, []))) AS n_token_ids
FROM kafka_trajectories
ARRAY JOIN steps AS step, arrayEnumerate(steps) AS step_index;

CREATE TABLE IF NOT EXISTS kafka_rewards
(
    event_id UUID, occurred_at DateTime64(3, 'UTC'), schema_version Int32,
    task_id String, trajectory_id String, attempt Int32, agent_id String, task_type String,
    policy_version Nullable(String), value Float64, components Map(String, Float64),
    source String, reason Nullable(String)
)
ENGINE = Kafka
SETTINGS kafka_broker_list = 'kafka:9092', kafka_topic_list = 'rewards',
         kafka_group_name = 'clickhouse-stormline', kafka_format = 'AvroConfluent',
         format_avro_schema_registry_url = 'http://schema-registry:8081/apis/ccompat/v7',
         kafka_num_consumers = 1, kafka_skip_broken_messages = 100;

CREATE MATERIALIZED VIEW IF NOT EXISTS mv_rewards TO rewards AS
SELECT _topic AS topic, toInt32(_partition) AS partition, toInt64(_offset) AS offset,
       fromUnixTimestamp64Milli(_timestamp_ms, 'UTC') AS ts, ifNull(_key, '') AS key,
       toString(event_id) AS event_id, occurred_at, schema_version,
       task_id, trajectory_id, attempt, agent_id, task_type,
       ifNull(policy_version, '') AS policy_version, value, components, source,
       ifNull(reason, '') AS reason
FROM kafka_rewards;

CREATE TABLE IF NOT EXISTS kafka_heartbeats
(
    event_id UUID, occurred_at DateTime64(3, 'UTC'), schema_version Int32,
    worker_id String, agent_ids Array(String), in_flight Int32, processed Int64,
    errors Int64, status String, detail Nullable(String)
)
ENGINE = Kafka
SETTINGS kafka_broker_list = 'kafka:9092', kafka_topic_list = 'heartbeats',
         kafka_group_name = 'clickhouse-stormline', kafka_format = 'AvroConfluent',
         format_avro_schema_registry_url = 'http://schema-registry:8081/apis/ccompat/v7',
         kafka_num_consumers = 1, kafka_skip_broken_messages = 100;

CREATE MATERIALIZED VIEW IF NOT EXISTS mv_heartbeats TO heartbeats AS
SELECT _topic AS topic, toInt32(_partition) AS partition, toInt64(_offset) AS offset,
       fromUnixTimestamp64Milli(_timestamp_ms, 'UTC') AS ts, ifNull(_key, '') AS key,
       toString(event_id) AS event_id, occurred_at, schema_version,
       worker_id, agent_ids, in_flight, processed, errors, status,
       ifNull(detail, '') AS detail
FROM kafka_heartbeats;

CREATE TABLE IF NOT EXISTS kafka_agent_health
(
    event_id UUID, occurred_at DateTime64(3, 'UTC'), schema_version Int32,
    agent_id String, status String, previous String, reason String
)
ENGINE = Kafka
SETTINGS kafka_broker_list = 'kafka:9092', kafka_topic_list = 'agent-health',
         kafka_group_name = 'clickhouse-stormline', kafka_format = 'AvroConfluent',
         format_avro_schema_registry_url = 'http://schema-registry:8081/apis/ccompat/v7',
         kafka_num_consumers = 1, kafka_skip_broken_messages = 100;

CREATE MATERIALIZED VIEW IF NOT EXISTS mv_agent_health TO agent_health AS
SELECT _topic AS topic, toInt32(_partition) AS partition, toInt64(_offset) AS offset,
       fromUnixTimestamp64Milli(_timestamp_ms, 'UTC') AS ts, ifNull(_key, '') AS key,
       toString(event_id) AS event_id, occurred_at, schema_version,
       agent_id, status, previous, reason
FROM kafka_agent_health;

CREATE TABLE IF NOT EXISTS kafka_checkpoints
(
    event_id UUID, occurred_at DateTime64(3, 'UTC'), schema_version Int32,
    policy String, version Int32, uri String, sha256 String, metrics Map(String, Float64),
    trained_on Array(Tuple(topic String, partition Int32, start_offset Int64,
                           end_offset Int64)),
    promoted Bool, decision String
)
ENGINE = Kafka
SETTINGS kafka_broker_list = 'kafka:9092', kafka_topic_list = 'checkpoints',
         kafka_group_name = 'clickhouse-stormline', kafka_format = 'AvroConfluent',
         format_avro_schema_registry_url = 'http://schema-registry:8081/apis/ccompat/v7',
         kafka_num_consumers = 1, kafka_skip_broken_messages = 100;

CREATE MATERIALIZED VIEW IF NOT EXISTS mv_checkpoints TO checkpoints AS
SELECT _topic AS topic, toInt32(_partition) AS partition, toInt64(_offset) AS offset,
       fromUnixTimestamp64Milli(_timestamp_ms, 'UTC') AS ts, ifNull(_key, '') AS key,
       toString(event_id) AS event_id, occurred_at, schema_version,
       policy, version, concat(policy, '@', toString(version)) AS policy_version, uri, sha256,
       metrics, promoted, decision, toJSONString(trained_on) AS trained_on
FROM kafka_checkpoints;

CREATE TABLE IF NOT EXISTS kafka_dead_letters
(
    event_id UUID, occurred_at DateTime64(3, 'UTC'), schema_version Int32,
    source_topic String, partition Int32, offset Int64, raw_key Nullable(String),
    raw_value Nullable(String), error_kind String, error String, consumer_group String
)
ENGINE = Kafka
SETTINGS kafka_broker_list = 'kafka:9092', kafka_topic_list = 'dead-letters',
         kafka_group_name = 'clickhouse-stormline', kafka_format = 'AvroConfluent',
         format_avro_schema_registry_url = 'http://schema-registry:8081/apis/ccompat/v7',
         kafka_num_consumers = 1, kafka_skip_broken_messages = 100;

-- The event's own partition/offset fields share their names with the origin columns, so a
-- subquery renames everything first and no alias shadows a column.
CREATE MATERIALIZED VIEW IF NOT EXISTS mv_dead_letters TO dead_letters AS
SELECT k_topic AS topic, k_partition AS partition, k_offset AS offset, k_ts AS ts, k_key AS key,
       k_event_id AS event_id, occurred_at, schema_version, source_topic,
       src_partition AS source_partition, src_offset AS source_offset, error_kind, error,
       consumer_group, k_raw_key AS raw_key, k_raw_value_bytes AS raw_value_bytes
FROM (
    SELECT _topic AS k_topic, toInt32(_partition) AS k_partition, toInt64(_offset) AS k_offset,
           fromUnixTimestamp64Milli(_timestamp_ms, 'UTC') AS k_ts, ifNull(_key, '') AS k_key,
           toString(event_id) AS k_event_id, occurred_at, schema_version, source_topic,
           partition AS src_partition, offset AS src_offset, error_kind, error, consumer_group,
           ifNull(raw_key, '') AS k_raw_key,
           toInt64(length(ifNull(raw_value, ''))) AS k_raw_value_bytes
    FROM kafka_dead_letters
);
