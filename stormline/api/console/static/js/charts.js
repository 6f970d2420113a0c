// SVG charts, no library: a time-series line chart (with optional bands) and an interval
// chart (a point with its 95% interval per category). Both return an SVG string.
"use strict";

const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#be185d",
  "#4d7c0f", "#7c3aed", "#b45309"];

const Charts = {
  color(i) {
    return COLORS[i % COLORS.length];
  },

  _ticks(lo, hi, n) {
    if (hi === lo) return [lo];
    const step = Math.pow(10, Math.floor(Math.log10((hi - lo) / n)));
    const mult = [1, 2, 5, 10].find((m) => (hi - lo) / (step * m) <= n) || 10;
    const s = step * mult;
    const out = [];
    for (let v = Math.ceil(lo / s) * s; v <= hi + 1e-9; v += s) out.push(+v.toFixed(10));
    return out;
  },

  _fmt(v) {
    const a = Math.abs(v);
    if (a >= 1e6) return (v / 1e6).toFixed(1) + "M";
    if (a >= 1e3) return (v / 1e3).toFixed(1) + "k";
    if (a >= 10 || Number.isInteger(v)) return String(Math.round(v * 10) / 10);
    return v.toFixed(2);
  },

  _clock(ms, span) {
    const d = new Date(ms);
    const hh = String(d.getUTCHours()).padStart(2, "0");
    const mm = String(d.getUTCMinutes()).padStart(2, "0");
    const ss = String(d.getUTCSeconds()).padStart(2, "0");
    return span > 6 * 3600e3 ? `${d.getUTCMonth() + 1}/${d.getUTCDate()} ${hh}:${mm}` : span > 600e3 ? `${hh}:${mm}` : `${hh}:${mm}:${ss}`;
  },

  // series: [{name, points: [[t_ms, y], ...], band?: [[t_ms, lo, hi], ...], dash?}]
  line(series, opts = {}) {
    const W = opts.width || 640, H = opts.height || 220;
    const L = 48, R = 10, T = 22, B = 26;
    const all = series.flatMap((s) => s.points);
    const bands = series.flatMap((s) => s.band || []);
    if (!all.length) return `<p class="empty">${opts.empty || "no data yet"}</p>`;
    const xs = all.map((p) => p[0]);
    let x0 = Math.min(...xs), x1 = Math.max(...xs);
    if (x1 === x0) { x0 -= 1000; x1 += 1000; }
    const ys = all.map((p) => p[1]).concat(bands.flatMap((b) => [b[1], b[2]]))
      .filter((v) => v !== null && Number.isFinite(v));
    let y0 = opts.yMin !== undefined ? opts.yMin : Math.min(0, ...ys);
    let y1 = opts.yMax !== undefined ? opts.yMax : Math.max(...ys);
    if (y1 === y0) y1 = y0 + 1;
    const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
    const sy = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
    let g = "";
    for (const v of Charts._ticks(y0, y1, 4)) {
      g += `<line x1="${L}" x2="${W - R}" y1="${sy(v)}" y2="${sy(v)}" class="grid"/>`;
      g += `<text x="${L - 4}" y="${sy(v) + 4}" text-anchor="end">${Charts._fmt(v)}</text>`;
    }
    const nt = Math.min(6, Math.max(2, Math.floor((W - L) / 110)));
    let prev = "";
    for (let i = 0; i <= nt; i++) {
      const x = x0 + ((x1 - x0) * i) / nt;
      const label = Charts._clock(x, x1 - x0);
      if (label === prev) continue; // a short span: one label per second at most
      prev = label;
      const anchor = i === 0 ? "start" : i === nt ? "end" : "middle";
      g += `<text x="${sx(x)}" y="${H - B + 14}" text-anchor="${anchor}">${label}</text>`;
    }
    series.forEach((s, i) => {
      const c = s.color || Charts.color(i);
      if (s.band && s.band.length) {
        const up = s.band.map((b) => `${sx(b[0])},${sy(b[2])}`);
        const down = s.band.slice().reverse().map((b) => `${sx(b[0])},${sy(b[1])}`);
        g += `<polygon points="${up.concat(down).join(" ")}" fill="${c}" opacity="0.15"/>`;
      }
      const pts = s.points.filter((p) => p[1] !== null && Number.isFinite(p[1]));
      const d = pts.map((p, j) => `${j ? "L" : "M"}${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join("");
      g += `<path d="${d}" fill="none" stroke="${c}" stroke-width="2" ${s.dash ? 'stroke-dasharray="5,4"' : ""}/>`;
      if (pts.length < 40) {
        for (const p of pts) g += `<circle cx="${sx(p[0])}" cy="${sy(p[1])}" r="2.5" fill="${c}"/>`;
      }
    });
    const legend = series.map((s, i) =>
      `<span><i style="background:${s.color || Charts.color(i)}"></i>${Console.esc(s.name)}</span>`).join("");
    const ylab = opts.y ? `<text x="4" y="11" class="axis-label">${Console.esc(opts.y)}</text>` : "";
    return `<figure class="chart"><svg viewBox="0 0 ${W} ${H}" width="${W}" height="${H}" class="line" role="img"
      aria-label="${Console.esc(opts.title || "")}">${g}${ylab}</svg>
      <figcaption class="legend">${legend}</figcaption></figure>`;
  },

  // rows: [{label, value, low, high, mark?}] drawn as a point with a whisker on [yMin, yMax].
  interval(rows, opts = {}) {
    if (!rows.length) return `<p class="empty">${opts.empty || "no estimates yet"}</p>`;
    const W = opts.width || 640, row = 22, L = 170, R = 60, T = 18;
    const H = T + rows.length * row + 18;
    const lo = opts.min !== undefined ? opts.min : 0, hi = opts.max !== undefined ? opts.max : 1;
    const sx = (v) => L + ((Math.min(hi, Math.max(lo, v)) - lo) / (hi - lo)) * (W - L - R);
    let g = "";
    for (const v of Charts._ticks(lo, hi, 5)) {
      g += `<line x1="${sx(v)}" x2="${sx(v)}" y1="${T - 6}" y2="${H - 14}" class="grid"/>`;
      g += `<text x="${sx(v)}" y="${T - 8}" text-anchor="middle">${Charts._fmt(v)}</text>`;
    }
    rows.forEach((r, i) => {
      const y = T + i * row + row / 2;
      const c = r.color || Charts.color(i);
      g += `<text x="${L - 8}" y="${y + 4}" text-anchor="end">${Console.esc(r.label)}</text>`;
      g += `<line x1="${sx(r.low)}" x2="${sx(r.high)}" y1="${y}" y2="${y}" stroke="${c}" stroke-width="3" opacity="0.5"/>`;
      g += `<circle cx="${sx(r.value)}" cy="${y}" r="4.5" fill="${c}"/>`;
      if (r.mark !== undefined && r.mark !== null) {
        g += `<line x1="${sx(r.mark)}" x2="${sx(r.mark)}" y1="${y - 7}" y2="${y + 7}" stroke="#111" stroke-width="2"/>`;
      }
      g += `<text x="${W - R + 6}" y="${y + 4}">${r.note ? Console.esc(r.note) : ""}</text>`;
    });
    return `<figure class="chart"><svg viewBox="0 0 ${W} ${H}" width="${W}" height="${H}" class="interval" role="img">${g}</svg>
      ${opts.caption ? `<figcaption>${Console.esc(opts.caption)}</figcaption>` : ""}</figure>`;
  },

  // ISO or epoch seconds/ms to epoch ms.
  ms(t) {
    if (typeof t === "number") return t < 1e12 ? t * 1000 : t;
    const s = String(t);
    return new Date(/Z|[+-]\d\d:?\d\d$/.test(s) ? s : s.replace(" ", "T") + "Z").getTime();
  },
};
