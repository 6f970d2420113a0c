// Tasks: find one by id and show its timeline (submitted -> assigned -> trajectory -> reward,
// every attempt), with timings since submission, the prompt and the output.
"use strict";

const C = Console;

function detail(e) {
  switch (e.kind) {
    case "submitted":
      return `type <b>${C.esc(e.task_type)}</b> · priority ${e.priority} · tenant ${C.esc(e.tenant)}
        ${e.expected ? ` · expected <span class="mono">${C.esc(e.expected)}</span>` : ""}
        <pre class="prompt">${C.esc(e.prompt)}</pre>`;
    case "assigned":
      return `attempt ${e.attempt} → <b>${C.esc(e.agent_id)}</b> · ${C.esc(e.policy)}/${C.esc(e.strategy)}
        ${e.policy_version ? ` · version ${C.esc(e.policy_version)}` : ""} · score ${C.num(e.score, 3)}
        · expires ${C.time(e.expires_at)}`;
    case "trajectory":
      return `attempt ${e.attempt} · <b>${C.esc(e.agent_id)}</b> (${C.esc(e.provider)} ${C.esc(e.model)})
        · <span class="pill ${e.status === "ok" ? "ok" : "error"}">${C.esc(e.status)}</span>
        · ${C.num(e.latency_ms, 0)} ms · ${e.n_steps} steps · ${e.prompt_tokens}+${e.completion_tokens} tokens
        · $${C.num(e.cost_usd, 5)}${e.error ? ` · error: ${C.esc(e.error)}` : ""}
        <pre class="output">${C.esc(e.output)}</pre>`;
    case "reward":
      return `attempt ${e.attempt} · <b>${C.num(e.value, 3)}</b> from ${C.esc(e.source)} for ${C.esc(e.agent_id)}
        · ${C.esc(e.reason)}`;
    default:
      return C.json(e);
  }
}

async function show(id) {
  const box = document.getElementById("task");
  if (!id) return;
  document.getElementById("task-id").value = id;
  box.innerHTML = `<p class="empty">loading ${C.esc(id)}…</p>`;
  try {
    const d = await C.api(`/console/api/tasks/${encodeURIComponent(id)}`);
    C.notice("store", d.store);
    const st = d.status;
    const t0 = d.events.length ? Charts.ms(d.events[0].at) : null;
    const items = d.events.map((e) => {
      const dt = t0 === null ? "" : `+${Math.round(Charts.ms(e.at) - t0)} ms`;
      return `<li class="${e.kind}"><b>${e.kind}</b> <span class="when">${C.time(e.at)} · ${dt}</span><div>${detail(e)}</div></li>`;
    });
    box.innerHTML = `<p id="task-status">status <span class="pill ${C.esc(st.state)}">${C.esc(st.state)}</span>
        · attempt ${st.attempt ?? "–"} · agent ${C.esc(st.agent_id ?? "–")} · reward ${C.num(st.reward, 3)}
        ${st.reward_source ? `(${C.esc(st.reward_source)})` : ""}${st.error ? ` · error ${C.esc(st.error)}` : ""}</p>
      <ol class="timeline" id="timeline">${items.join("") || '<li class="empty">no events in the analytics store yet (the sink writes every few seconds)</li>'}</ol>`;
  } catch (e) {
    // Its own box: the newest-tasks refresh clears the page's error box every few seconds.
    box.innerHTML = `<div class="error" id="task-error" role="alert">${C.esc(e.message)}</div>`;
  }
}

async function recent() {
  const d = await C.api("/console/api/tasks?limit=25");
  C.notice("store", d.store);
  document.getElementById("recent").innerHTML = C.table(d.tasks, [
    ["task_id", "task", (v) => `<a class="link" href="#id=${encodeURIComponent(v)}">${C.esc(v)}</a>`],
    ["task_type", "type"],
    ["occurred_at", "submitted", (v) => C.time(v)],
    ["state", "state", (v) => `<span class="pill ${C.esc(v)}">${C.esc(v || "–")}</span>`],
    ["agent_id", "agent"],
  ], { empty: "no tasks in the analytics store yet" });
}

(async () => {
  await C.header(document.body.dataset.page);
  document.getElementById("find").addEventListener("submit", (ev) => {
    ev.preventDefault();
    location.hash = "id=" + encodeURIComponent(document.getElementById("task-id").value.trim());
  });
  window.addEventListener("hashchange", () => show(C.hashParams().get("id")));
  show(C.hashParams().get("id"));
  C.every(5000, recent);
})();
