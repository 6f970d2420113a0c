// Dead letters: reason, source, the refused record decoded where it decodes; replay the
// selected ones to their source topics (POST /v1/dead-letters/replay).
"use strict";

const C = Console;
const selected = new Set();

function count() {
  document.getElementById("selected").textContent = `${selected.size} selected`;
  document.getElementById("replay").disabled = selected.size === 0;
}

async function load() {
  const letters = await C.api("/v1/dead-letters?limit=200");
  for (const s of [...selected]) if (!letters.some((l) => l.letter === s)) selected.delete(s);
  document.getElementById("letters").innerHTML = C.table(letters, [
    ["letter", "", (v, r) => `<input type="checkbox" class="pick" data-letter="${C.esc(v)}" ${selected.has(v) ? "checked" : ""} ${r.replayable ? "" : "disabled title='not replayable'"}>`],
    ["letter", "letter (partition:offset)", (v) => `<span class="mono">${C.esc(v)}</span>`],
    ["occurred_at", "when", (v) => C.time(v)],
    ["reason", "reason", (v) => `<span class="pill error">${C.esc(v)}</span>`],
    ["source_topic", "from", (v, r) => `${C.esc(v)}[${r.source_partition}]@${r.source_offset}`],
    ["consumer_group", "refused by"],
    ["error", "error", (v) => `<div class="errtext">${C.esc(v)}</div>`],
    ["preview", "record (decoded preview)", (v) => `<div class="preview">${C.json(v)}</div>`],
    ["bytes", "bytes"],
  ], { empty: "no dead letters: every record was handled", cls: "letters" });
  document.querySelectorAll("input.pick").forEach((box) =>
    box.addEventListener("change", () => {
      if (box.checked) selected.add(box.dataset.letter);
      else selected.delete(box.dataset.letter);
      count();
    }));
  count();
}

async function replay() {
  const out = document.getElementById("replay-result");
  const letters = [...selected];
  try {
    const r = await C.api("/v1/dead-letters/replay", { method: "POST", body: { letters } });
    const topics = Object.entries(r.topics).map(([t, n]) => `${n} to ${t}`).join(", ");
    out.innerHTML = `<div class="ok" id="replayed">replayed ${r.replayed} of ${letters.length}${topics ? ": " + C.esc(topics) : ""}
      ${r.skipped.length ? "<br>skipped: " + C.esc(r.skipped.join("; ")) : ""}</div>`;
    selected.clear();
    await load();
  } catch (e) {
    out.innerHTML = `<div class="error" role="alert">${C.esc(e.message)}</div>`;
  }
}

(async () => {
  await C.header(document.body.dataset.page);
  document.getElementById("replay").addEventListener("click", replay);
  document.getElementById("reload").addEventListener("click", () => load().catch((e) => C.error(e.message)));
  try {
    await load();
  } catch (e) {
    C.error(e.message);
  }
})();
