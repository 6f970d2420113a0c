// Agents: health and circuit (the router's breaker), cost and latency (analytics store), the
// router's estimate with its uncertainty per (task type, agent), traffic share over time.
"use strict";

const C = Console;

function pill(v) {
  const cls = String(v || "").split(" ")[0];
  return `<span class="pill ${C.esc(cls)}">${C.esc(v)}</span>`;
}

function render(d) {
  C.notice("store", d.store !== "ok" ? d.store : d.router !== "ok" ? d.router : "ok");
  const agents = d.agents.map((a) => ({ ...a, ...(a.stats || {}), agent_id: a.agent_id }));
  const colors = {};
  d.agents.forEach((a, i) => (colors[a.agent_id] = Charts.color(i)));
  document.getElementById("agents-table").innerHTML = C.table(agents, [
    ["agent_id", "agent", (v) => `<b style="color:${colors[v]}">${C.esc(v)}</b>`],
    ["health", "health", pill],
    ["circuit", "circuit", pill],
    ["health_reason", "why"],
    ["health_since", "since", (v) => C.time(v)],
    ["capabilities", "capabilities", (v) => C.esc((v || []).join(", "))],
    ["attempts", "attempts", (v) => C.num(v)],
    ["success_rate", "success", (v) => C.pct(v)],
    ["mean_reward", "mean reward (95%)", (v, r) =>
      v === null || v === undefined ? "–" : `${v.toFixed(3)} <span class="empty">[${C.num(r.reward_ci95_low, 2)}, ${C.num(r.reward_ci95_high, 2)}]</span>`],
    ["p50_latency_ms", "p50 ms", (v) => C.num(v, 0)],
    ["p95_latency_ms", "p95 ms", (v) => C.num(v, 0)],
    ["tokens", "tokens", (v) => C.num(v)],
    ["cost_usd", "cost USD", (v) => (v === null || v === undefined ? "–" : "$" + v.toFixed(4))],
  ], { empty: "no agent has been seen yet", cls: "agents" });

  const byType = {};
  for (const e of d.estimates) (byType[e.task_type] = byType[e.task_type] || []).push(e);
  const rows = [];
  for (const [t, es] of Object.entries(byType)) {
    for (const e of es) {
      rows.push({
        label: `${t} · ${e.agent_id}`, value: e.posterior_mean, low: e.low, high: e.high,
        mark: e.value, color: colors[e.agent_id],
        note: `${e.rewards} / ${e.share === null ? "–" : Math.round(100 * e.share) + "%"}`,
      });
    }
  }
  document.getElementById("estimates").innerHTML =
    Charts.interval(rows, { width: 900, empty: "the router has no estimates yet (" + d.router + ")" });

  const types = [...new Set(d.share.map((s) => s.task_type))];
  document.getElementById("share").innerHTML = types.length
    ? types.map((t) => `<div><h2>${C.esc(t)}</h2>${Charts.line(
        d.share.filter((s) => s.task_type === t).map((s) => ({
          name: s.agent_id, color: colors[s.agent_id],
          points: s.points.map(([b, v]) => [Charts.ms(b), v]),
        })), { yMin: 0, yMax: 1, height: 180, y: "share" })}</div>`).join("")
    : `<p class="empty">no assignments in the analytics store yet</p>`;
}

(async () => {
  await C.header(document.body.dataset.page);
  C.every(5000, async () => render(await C.api("/console/api/agents?since=15m&bucket=15")));
})();
