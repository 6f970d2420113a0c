// Learning: reward and cumulative regret over time against a random router, A/B by policy
// version and strategy, the trainer's checkpoints with metrics and promotion decisions.
"use strict";

const C = Console;

function render(d) {
  C.notice("store", d.store);
  const r = d.regret;
  const last = r.length ? r[r.length - 1] : null;
  document.getElementById("stats").innerHTML = [
    ["rewards", last ? C.num(last.cum_rewards) : "–", "rewards in window"],
    ["cum-regret", last ? C.num(last.cum_regret, 2) : "–", "cumulative regret (router)"],
    ["cum-regret-random", last ? C.num(last.cum_regret_random, 2) : "–", "cumulative regret (random)"],
    ["checkpoints-n", C.num(d.checkpoints.length), "checkpoints"],
    ["promoted-n", C.num(d.checkpoints.filter((c) => c.promoted).length), "promoted"],
  ].map(([id, v, k]) => `<div class="stat"><div class="v" id="${id}">${v}</div><div class="k">${k}</div></div>`).join("");
  document.getElementById("reward-chart").innerHTML = Charts.line([
    { name: "router (mean reward)", points: r.map((x) => [Charts.ms(x.bucket), x.mean_reward]) },
    { name: "random baseline (expected)", color: "#6b7280", dash: true,
      points: r.map((x) => [Charts.ms(x.bucket), x.random_expected]) },
  ], { yMin: 0, yMax: 1, y: "reward", empty: "no rewards in the analytics store yet" });
  document.getElementById("regret-chart").innerHTML = Charts.line([
    { name: "router", points: r.map((x) => [Charts.ms(x.bucket), x.cum_regret]) },
    { name: "random baseline", color: "#6b7280", dash: true,
      points: r.map((x) => [Charts.ms(x.bucket), x.cum_regret_random]) },
  ], { y: "regret", empty: "no rewards in the analytics store yet" });

  const arms = {};
  for (const x of d.reward_over_time) {
    const k = `${x.policy} · ${x.strategy}`;
    (arms[k] = arms[k] || []).push([Charts.ms(x.bucket), x.mean_reward]);
  }
  document.getElementById("ab-chart").innerHTML = Charts.line(
    Object.entries(arms).map(([name, points]) => ({ name, points })),
    { yMin: 0, yMax: 1, y: "reward", height: 200, width: 1100, empty: "no rewards yet" });
  document.getElementById("ab").innerHTML = C.table(d.ab, [
    ["policy", "policy version"], ["strategy", "strategy"], ["n", "rewards", (v) => C.num(v)],
    ["mean_reward", "mean reward", (v) => C.num(v, 3)],
    ["low", "95% interval", (v, x) => (v === null ? "–" : `[${v.toFixed(3)}, ${x.high.toFixed(3)}]`)],
    ["first_seen", "first", (v) => C.time(v)], ["last_seen", "last", (v) => C.time(v)],
  ], { cls: "ab" });
  document.getElementById("checkpoints").innerHTML = C.table(d.checkpoints, [
    ["occurred_at", "when", (v) => C.time(v)], ["policy", "policy"], ["version", "version"],
    ["promoted", "promoted", (v) => `<span class="pill ${v ? "ok" : "error"}">${v ? "promoted" : "kept"}</span>`],
    ["decision", "decision"],
    ["metrics", "metrics", (v) => `<span class="mono">${C.esc(Object.entries(v || {}).map(([k, m]) => `${k}=${typeof m === "number" && !Number.isInteger(m) ? m.toFixed(3) : m}`).join(" "))}</span>`],
    ["uri", "uri", (v) => `<span class="mono">${C.esc(v)}</span>`],
  ], { empty: "no checkpoint yet: the trainer publishes one per update", cls: "checkpoints" });
}

// About 60 buckets over the chosen window, never under 5 s.
const BUCKET_S = { "15m": 15, "1h": 60, "6h": 360, "24h": 1440, "7d": 10080 };

(async () => {
  await C.header(document.body.dataset.page);
  const since = document.getElementById("since");
  let timer = null;
  const start = () => {
    if (timer) clearInterval(timer);
    const q = `since=${since.value}&bucket=${BUCKET_S[since.value]}`;
    timer = C.every(10000, async () => render(await C.api(`/console/api/learning?${q}`)));
  };
  since.addEventListener("change", start);
  start();
})();
