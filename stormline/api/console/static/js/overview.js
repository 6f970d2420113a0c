// Overview: rates from Kafka's offsets (live, every 2 s), lag per consumer group, and the
// analytics store's outcomes and rewards per bucket.
"use strict";

const C = Console;
const SHOWN = ["tasks", "assignments", "trajectories", "rewards", "dead-letters"];

function stat(id, value, label) {
  return `<div class="stat"><div class="v" id="${id}">${value}</div><div class="k">${label}</div></div>`;
}

function sum(rows, k) {
  return rows.reduce((a, r) => a + (r[k] || 0), 0);
}

function render(d) {
  C.notice("store", d.store);
  const outcomes = d.outcomes || [];
  const traj = sum(outcomes, "trajectories");
  const rewards = d.rewards || [];
  const nRewards = sum(rewards, "rewards");
  const meanReward = nRewards ? rewards.reduce((a, r) => a + r.mean_reward * r.rewards, 0) / nRewards : null;
  const rate = (k) => (d.rates[k] === null || d.rates[k] === undefined ? "–" : d.rates[k].toFixed(1));
  const lagTotal = Object.values(d.lag).reduce((a, b) => a + b, 0);
  document.getElementById("stats").innerHTML = [
    stat("tasks-rate", rate("tasks"), "tasks/s (last 10 s)"),
    stat("rewards-rate", rate("rewards"), "rewards/s (reward rate)"),
    stat("tasks-total", C.num(d.totals.tasks), "tasks published (total)"),
    stat("rewards-total", C.num(d.totals.rewards), "rewards (total)"),
    stat("success-rate", traj ? C.pct(sum(outcomes, "ok") / traj) : "–", `success rate (${d.since})`),
    stat("error-rate", traj ? C.pct(sum(outcomes, "errors") / traj) : "–", `error rate (${d.since})`),
    stat("mean-reward", C.num(meanReward, 3), `mean reward (${d.since})`),
    stat("lag-total", C.num(lagTotal), "consumer lag (all groups)"),
    stat("dead-total", C.num(d.totals["dead-letters"]), "dead letters (total)"),
  ].join("");

  const series = SHOWN.map((k) => ({
    name: k,
    points: d.rate_series.map(([t, r]) => [Charts.ms(t), r[k] || 0]),
  }));
  document.getElementById("rates-chart").innerHTML = Charts.line(series, {
    y: "msg/s", empty: "collecting samples (one every second while this page is open)…",
  });
  const groups = [...new Set(d.lag_series.flatMap(([, g]) => Object.keys(g)))].sort();
  document.getElementById("lag-chart").innerHTML = Charts.line(
    groups.map((g) => ({ name: g, points: d.lag_series.map(([t, l]) => [Charts.ms(t), l[g] || 0]) })),
    { y: "records", empty: "collecting samples…" }
  );
  document.getElementById("outcomes-chart").innerHTML = Charts.line(
    [
      { name: "ok", color: "#16a34a", points: outcomes.map((r) => [Charts.ms(r.bucket), r.ok]) },
      { name: "error", color: "#dc2626", points: outcomes.map((r) => [Charts.ms(r.bucket), r.errors]) },
    ],
    { y: `per ${d.bucket_s} s`, empty: "no trajectories in the analytics store yet" }
  );
  document.getElementById("reward-chart").innerHTML = Charts.line(
    [{ name: "mean reward", points: rewards.map((r) => [Charts.ms(r.bucket), r.mean_reward]) }],
    { y: "reward", yMin: 0, yMax: 1, empty: "no rewards in the analytics store yet" }
  );
  const lagRows = Object.entries(d.lag).map(([group, lag]) => ({
    group, lag,
    parts: d.lag_detail.filter((g) => g.group === group).map((g) => `${g.topic.slice(d.prefix.length)}[${g.partition}]: ${g.lag}`).join(", "),
  }));
  document.getElementById("lag-table").innerHTML = C.table(
    lagRows,
    [["group", "consumer group"], ["lag", "lag (records)", (v) => C.num(v)], ["parts", "behind on"]],
    { empty: "no consumer group has committed offsets on this deployment's topics yet" }
  );
}

(async () => {
  await C.header(document.body.dataset.page);
  C.every(2000, async () => render(await C.api("/console/api/overview?since=15m&bucket=10")));
})();
