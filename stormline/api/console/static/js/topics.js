// Topics: every topic of this deployment (its prefix) and the messages of one, decoded from
// Avro with the catalog's event type: partition, offset, key, time, value, headers.
"use strict";

const C = Console;
let current = null;
let topicsCache = [];

async function loadTopics() {
  const d = await C.api("/console/api/topics");
  topicsCache = d.topics;
  document.getElementById("topics").innerHTML = C.table(d.topics, [
    ["name", "topic", (v) => `<a class="link" href="#topic=${encodeURIComponent(v)}">${C.esc(v)}</a>`],
    ["partitions", "parts"],
    ["messages", "messages", (v) => C.num(v)],
    ["event", "event", (v) => C.esc(v || "(internal)")],
  ], { empty: "no topics under this prefix" });
  // A topic named in the address wins; else show the first busy one of the loop's own.
  if (!current && !C.hashParams().get("topic") && d.topics.length) {
    const prefer = ["tasks", "trajectories", "rewards"].map((n) => d.prefix + n);
    const first = d.topics.find((t) => prefer.includes(t.name) && t.messages > 0) || d.topics[0];
    location.hash = "topic=" + encodeURIComponent(first.name);
  }
}

async function browse() {
  const p = C.hashParams();
  current = p.get("topic");
  if (!current) return;
  const t = topicsCache.find((x) => x.name === current);
  document.getElementById("topic-title").textContent =
    `Messages of ${current}` + (t && t.event ? ` (${t.event})` : "");
  const sel = document.getElementById("partition");
  const n = t ? t.partitions : 0;
  if (sel.options.length !== n + 1) {
    sel.innerHTML = `<option value="">all</option>` +
      Array.from({ length: n }, (_, i) => `<option value="${i}">${i}</option>`).join("");
  }
  const q = new URLSearchParams({ limit: document.getElementById("limit").value || "25" });
  if (sel.value !== "") q.set("partition", sel.value);
  const off = document.getElementById("offset").value;
  if (off !== "") q.set("offset", off);
  const box = document.getElementById("messages");
  try {
    const d = await C.api(`/console/api/topics/${encodeURIComponent(current)}/messages?${q}`);
    box.innerHTML = C.table(d.messages, [
      ["partition", "part"],
      ["offset", "offset"],
      ["key", "key", (v) => `<span class="mono">${C.esc(v)}</span>`],
      ["timestamp", "time (UTC)", (v) => C.time(v)],
      ["value", "value", (v, r) => C.json(v) + (Object.keys(r.headers || {}).length ? C.json({ headers: r.headers }) : "")],
      ["bytes", "bytes"],
    ], { empty: "no messages in this range", cls: "messages" });
    C.error(null);
  } catch (e) {
    box.innerHTML = "";
    C.error(e.message);
  }
}

(async () => {
  await C.header(document.body.dataset.page);
  document.getElementById("browse").addEventListener("submit", (ev) => {
    ev.preventDefault();
    browse();
  });
  window.addEventListener("hashchange", () => {
    document.getElementById("partition").value = "";
    document.getElementById("offset").value = "";
    browse();
  });
  try {
    await loadTopics();
    await browse();
  } catch (e) {
    C.error(e.message);
  }
  setInterval(() => loadTopics().catch((e) => C.error(e.message)), 10000);
})();
