// The console's shared part: the API key (sessionStorage), fetch with Bearer, the header
// with navigation and login, error text that says what went wrong, formatting helpers.
"use strict";

const KEY = "stormline.apiKey";
const PAGES = [
  ["index.html", "Overview"],
  ["agents.html", "Agents"],
  ["tasks.html", "Tasks"],
  ["topics.html", "Topics"],
  ["deadletters.html", "Dead letters"],
  ["learning.html", "Learning"],
];

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

const Console = {
  key() {
    return sessionStorage.getItem(KEY) || "";
  },

  // fetch JSON from the API with the stored key; throws ApiError with a readable message.
  async api(path, options = {}) {
    const headers = Object.assign({}, options.headers || {});
    const key = Console.key();
    if (key) headers["Authorization"] = "Bearer " + key;
    if (options.body !== undefined) headers["Content-Type"] = "application/json";
    let resp;
    try {
      resp = await fetch(path, {
        method: options.method || "GET",
        headers,
        body: options.body === undefined ? undefined : JSON.stringify(options.body),
      });
    } catch (e) {
      throw new ApiError(0, `${path}: the API did not answer (${e.message})`);
    }
    let data = null;
    const text = await resp.text();
    try {
      data = text ? JSON.parse(text) : null;
    } catch (e) {
      data = text;
    }
    if (!resp.ok) throw new ApiError(resp.status, Console.explain(path, resp.status, data));
    return data;
  },

  // What a failed request means for the person looking at the page.
  explain(path, status, data) {
    let detail = data && data.detail !== undefined ? data.detail : data;
    if (typeof detail !== "string") detail = JSON.stringify(detail);
    if (status === 401) {
      return `Not signed in (401): ${detail}. Paste an API key above.`;
    }
    if (status === 403) {
      const m = /needs the '(\w+)' role/.exec(detail || "");
      const roles = Console.roles ? Console.roles.join(", ") || "none" : "unknown";
      const need = m ? `the '${m[1]}' role` : "a role this key does not have";
      return `Denied (403): ${path} needs ${need}; this key has: ${roles}.`;
    }
    if (status === 503) return `A dependency is unavailable (503) for ${path}: ${detail}`;
    return `${path} failed (${status}): ${detail}`;
  },

  // The header: navigation, the key form, who is signed in.
  async header(page) {
    const bar = document.getElementById("bar");
    const nav = PAGES.map(
      ([href, name]) =>
        `<a href="${href}" class="${name === page ? "here" : ""}">${name}</a>`
    ).join("");
    bar.innerHTML = `<span class="brand">Stormline</span><nav>${nav}</nav>
      <form id="login"><input id="api-key" type="password" placeholder="paste an API key"
        autocomplete="off"><button type="submit">Use key</button>
        <button type="button" id="logout">Sign out</button></form>
      <span id="who" class="who"></span>`;
    document.getElementById("login").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const v = document.getElementById("api-key").value.trim();
      if (v) sessionStorage.setItem(KEY, v);
      location.reload();
    });
    document.getElementById("logout").addEventListener("click", () => {
      sessionStorage.removeItem(KEY);
      location.reload();
    });
    await Console.whoami();
  },

  async whoami() {
    const who = document.getElementById("who");
    if (!Console.key()) {
      who.textContent = "not signed in";
      Console.roles = [];
      return null;
    }
    try {
      const me = await Console.api("/console/api/whoami");
      Console.roles = me.roles;
      who.textContent = `tenant ${me.tenant} · roles: ${me.roles.join(", ") || "none"}`;
      return me;
    } catch (e) {
      Console.roles = [];
      who.textContent = "key refused";
      return null;
    }
  },

  // Show (or clear) the page's error box; each page has one with id "error".
  error(message) {
    const box = document.getElementById("error");
    if (!message) {
      box.hidden = true;
      box.textContent = "";
      return;
    }
    box.hidden = false;
    box.textContent = message;
  },

  // A warning for a partial answer (the analytics store down while Kafka answers).
  notice(id, store) {
    const el = document.getElementById(id);
    if (!el) return;
    el.hidden = !store || store === "ok";
    el.textContent = store && store !== "ok" ? store : "";
  },

  // Run ``load`` now and every ``ms``; errors go to the error box, success clears it.
  every(ms, load) {
    let busy = false;
    const run = async () => {
      if (busy) return;
      busy = true;
      try {
        await load();
        Console.error(null);
      } catch (e) {
        Console.error(e.message);
      } finally {
        busy = false;
      }
    };
    run();
    return setInterval(run, ms);
  },

  esc(v) {
    return String(v === null || v === undefined ? "" : v).replace(
      /[&<>"']/g,
      (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]
    );
  },

  num(v, digits = 2) {
    if (v === null || v === undefined || Number.isNaN(v)) return "–";
    if (typeof v !== "number") return Console.esc(v);
    if (Number.isInteger(v)) return v.toLocaleString("en");
    return v.toFixed(digits);
  },

  pct(v) {
    return v === null || v === undefined ? "–" : (100 * v).toFixed(1) + "%";
  },

  time(v) {
    if (v === null || v === undefined || v === "") return "–";
    const d = typeof v === "number" ? new Date(v) : new Date(v);
    if (Number.isNaN(d.getTime())) return Console.esc(v);
    return d.toISOString().replace("T", " ").replace("Z", "").slice(0, 23);
  },

  // [{col: value}] as an HTML table; ``cols`` is [[key, title, format?], ...].
  table(rows, cols, opts = {}) {
    if (!rows || !rows.length) return `<p class="empty">${opts.empty || "nothing yet"}</p>`;
    const head = cols.map(([, t]) => `<th>${Console.esc(t)}</th>`).join("");
    const body = rows
      .map((r, i) => {
        const tds = cols
          .map(([k, , f]) => `<td>${f ? f(r[k], r, i) : Console.esc(r[k])}</td>`)
          .join("");
        return `<tr>${tds}</tr>`;
      })
      .join("");
    return `<table class="${opts.cls || ""}"><thead><tr>${head}</tr></thead><tbody>${body}</tbody></table>`;
  },

  // A JSON value, pretty, escaped, in a collapsible block.
  json(v, open = false) {
    const text = typeof v === "string" ? v : JSON.stringify(v, null, 2);
    const short = text.length > 90 ? text.slice(0, 90).replace(/\s+/g, " ") + "…" : text;
    return `<details ${open ? "open" : ""}><summary>${Console.esc(short)}</summary><pre>${Console.esc(text)}</pre></details>`;
  },

  hashParams() {
    return new URLSearchParams(location.hash.replace(/^#/, ""));
  },
};
