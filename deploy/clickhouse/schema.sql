-- Stormline tables on a ClickHouse server (the sink creates them when it starts; this file
-- is also the reference for DBAs). Apply with:
--   clickhouse-client --query "CREATE DATABASE IF NOT EXISTS stormline"
--   clickhouse-client --database stormline --multiquery < deploy/clickhouse/schema.sql
--
-- GENERATED from schemas/avro by consumers/sink/tables.py; do not edit. Regenerate with
--   python -m stormline.consumers.sink.tables --ddl > deploy/clickhouse/schema.sql
-- (tests/test_event_shapes.py fails when this file and the generator differ). The same SQL
-- runs on chDB over the sink's Parquet parts and on these tables.
--
-- One row per event id: the sink never re-inserts an offset it already stored, nor an event
-- id the table holds at a lower offset (a re-sent trajectory, a re-scored reward), and each
-- insert carries an insert_deduplication_token. ReplacingMergeTree is the last line: its sort
-- key ends with event_id (steps: event_id, step_index) and holds only columns that are the
-- same in every copy of an event, so merges and FINAL collapse copies to one row (the sink
-- queries with final=1). No PARTITION BY: copies of one event may differ in occurred_at
-- (a re-scored reward), and ReplacingMergeTree only collapses within one partition.

CREATE TABLE IF NOT EXISTS tasks
(
    `topic` String,
    `partition` Int32,
    `offset` Int64,
    `ts` DateTime64(3, 'UTC'),
    `key` String,
    `event_id` String,
    `occurred_at` DateTime64(3, 'UTC'),
    `schema_version` Int32,
    `task_id` String,
    `tenant` String,
    `task_type` String,
    `prompt` String,
    `priority` Int32,
    `required_capabilities` Array(String),
    `expected` String,
    `evaluator` String,
    `deadline_ms` Int64,
    `metadata` Map(String, String)
)
ENGINE = ReplacingMergeTree
ORDER BY (tenant, task_type, task_id, event_id)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE TABLE IF NOT EXISTS assignments
(
    `topic` String,
    `partition` Int32,
    `offset` Int64,
    `ts` DateTime64(3, 'UTC'),
    `key` String,
    `event_id` String,
    `occurred_at` DateTime64(3, 'UTC'),
    `schema_version` Int32,
    `task_id` String,
    `attempt` Int32,
    `agent_id` String,
    `policy` String,
    `strategy` String,
    `policy_version` String,
    `score` Float64,
    `epsilon` Nullable(Float64),
    `assigned_at` DateTime64(3, 'UTC'),
    `expires_at` DateTime64(3, 'UTC'),
    `tenant` String,
    `task_type` String,
    `priority` Int32
)
ENGINE = ReplacingMergeTree
ORDER BY (task_type, task_id, event_id)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE TABLE IF NOT EXISTS trajectories
(
    `topic` String,
    `partition` Int32,
    `offset` Int64,
    `ts` DateTime64(3, 'UTC'),
    `key` String,
    `event_id` String,
    `occurred_at` DateTime64(3, 'UTC'),
    `schema_version` Int32,
    `task_id` String,
    `trajectory_id` String,
    `attempt` Int32,
    `agent_id` String,
    `task_type` String,
    `provider` String,
    `model` String,
    `policy_version` String,
    `n_steps` Int32,
    `output` String,
    `status` String,
    `error` String,
    `prompt_tokens` Int64,
    `completion_tokens` Int64,
    `total_tokens` Int64,
    `cost_usd` Float64,
    `latency_ms` Float64,
    `evaluator` String,
    `final` Bool
)
ENGINE = ReplacingMergeTree
ORDER BY (task_type, task_id, event_id)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE TABLE IF NOT EXISTS steps
(
    `topic` String,
    `partition` Int32,
    `offset` Int64,
    `ts` DateTime64(3, 'UTC'),
    `key` String,
    `event_id` String,
    `occurred_at` DateTime64(3, 'UTC'),
    `schema_version` Int32,
    `task_id` String,
    `trajectory_id` String,
    `agent_id` String,
    `step_index` Int32,
    `role` String,
    `content` String,
    `tool_names` Array(String),
    `prompt_tokens` Int64,
    `completion_tokens` Int64,
    `latency_ms` Float64,
    `n_token_ids` Int32
)
ENGINE = ReplacingMergeTree
ORDER BY (task_id, event_id, step_index)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE TABLE IF NOT EXISTS rewards
(
    `topic` String,
    `partition` Int32,
    `offset` Int64,
    `ts` DateTime64(3, 'UTC'),
    `key` String,
    `event_id` String,
    `occurred_at` DateTime64(3, 'UTC'),
    `schema_version` Int32,
    `task_id` String,
    `trajectory_id` String,
    `attempt` Int32,
    `agent_id` String,
    `task_type` String,
    `policy_version` String,
    `value` Float64,
    `components` Map(String, Float64),
    `source` String,
    `reason` String
)
ENGINE = ReplacingMergeTree
ORDER BY (task_type, task_id, event_id)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE TABLE IF NOT EXISTS heartbeats
(
    `topic` String,
    `partition` Int32,
    `offset` Int64,
    `ts` DateTime64(3, 'UTC'),
    `key` String,
    `event_id` String,
    `occurred_at` DateTime64(3, 'UTC'),
    `schema_version` Int32,
    `worker_id` String,
    `agent_ids` Array(String),
    `in_flight` Int32,
    `processed` Int64,
    `errors` Int64,
    `status` String,
    `detail` String
)
ENGINE = ReplacingMergeTree
ORDER BY (worker_id, event_id)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE TABLE IF NOT EXISTS agent_health
(
    `topic` String,
    `partition` Int32,
    `offset` Int64,
    `ts` DateTime64(3, 'UTC'),
    `key` String,
    `event_id` String,
    `occurred_at` DateTime64(3, 'UTC'),
    `schema_version` Int32,
    `agent_id` String,
    `status` String,
    `previous` String,
    `reason` String
)
ENGINE = ReplacingMergeTree
ORDER BY (agent_id, event_id)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE TABLE IF NOT EXISTS checkpoints
(
    `topic` String,
    `partition` Int32,
    `offset` Int64,
    `ts` DateTime64(3, 'UTC'),
    `key` String,
    `event_id` String,
    `occurred_at` DateTime64(3, 'UTC'),
    `schema_version` Int32,
    `policy` String,
    `version` Int32,
    `policy_version` String,
    `uri` String,
    `sha256` String,
    `metrics` Map(String, Float64),
    `trained_on` String,
    `promoted` Bool,
    `decision` String
)
ENGINE = ReplacingMergeTree
ORDER BY (policy, version, event_id)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE TABLE IF NOT EXISTS dead_letters
(
    `topic` String,
    `partition` Int32,
    `offset` Int64,
    `ts` DateTime64(3, 'UTC'),
    `key` String,
    `event_id` String,
    `occurred_at` DateTime64(3, 'UTC'),
    `schema_version` Int32,
    `source_topic` String,
    `source_partition` Int32,
    `source_offset` Int64,
    `raw_key` String,
    `raw_value_bytes` Int64,
    `error_kind` String,
    `error` String,
    `consumer_group` String
)
ENGINE = ReplacingMergeTree
ORDER BY (error_kind, source_topic, event_id)
SETTINGS non_replicated_deduplication_window = 10000;
