(function () {
  "use strict";
  const data = JSON.parse(document.getElementById("report-data").textContent);
  const config = {displaylogo: false, responsive: true};
  function layout(x, y) {
    return {margin: {l: 64, r: 16, t: 10, b: 48}, hovermode: "closest", xaxis: {title: {text: x}},
            yaxis: {title: {text: y}}, legend: {orientation: "h", y: -0.2}, hoverlabel: {align: "left"}};
  }
  function series(rows, key) {
    return rows.filter(h => h[key] !== null && h[key] !== undefined);
  }
  const h = data.history, p = data.partial, traces = [];
  const best = series(h, "best"), mean = series(h, "mean"), genBest = series(h, "gen_best");
  traces.push({x: best.map(r => r.generation), y: best.map(r => r.best), name: "best so far",
               mode: "lines+markers", line: {color: "#1f77b4"}});
  traces.push({x: mean.map(r => r.generation), y: mean.map(r => r.mean), name: "population mean",
               mode: "lines+markers", line: {color: "#ff7f0e"}});
  traces.push({x: genBest.map(r => r.generation), y: genBest.map(r => r.gen_best), name: "generation's best",
               mode: "lines", line: {color: "#2ca02c", dash: "dot"}});
  if (p.length) {
    traces.push({x: p.map(r => r.generation), y: p.map(r => r.best), name: "in progress: best so far",
                 mode: "markers", marker: {color: "#1f77b4", symbol: "circle-open", size: 10},
                 text: p.map(r => r.evaluated + " evaluated so far"), hovertemplate: "%{y:.4f}, %{text}"});
    traces.push({x: p.map(r => r.generation), y: p.map(r => r.mean), name: "in progress: mean of its evaluations",
                 mode: "markers", marker: {color: "#ff7f0e", symbol: "circle-open", size: 10}});
  }
  const hl = layout("generation", "score (dev)");
  hl.xaxis.dtick = 1;
  Plotly.newPlot("plot-history", traces, hl, config);

  const hover = "%{text}<extra></extra>";
  const ft = [];
  if (data.front_run) {
    ft.push({x: data.all.x, y: data.all.y, text: data.all.text, hovertemplate: hover, mode: "markers",
             name: "every evaluation", marker: {color: "rgba(120,130,140,0.45)", size: 7}});
    ft.push({x: data.front.x, y: data.front.y, text: data.front.text, hovertemplate: hover, mode: "lines+markers",
             name: "Pareto front", line: {shape: "hv", color: "#d62728"}, marker: {size: 10, color: "#d62728"}});
  } else {
    ft.push({x: data.all.x, y: data.all.y, text: data.all.text, hovertemplate: hover, mode: "markers",
             name: "every evaluation", marker: {size: 8, color: data.all.generation, colorscale: "Viridis",
             showscale: true, colorbar: {title: {text: "gen"}, thickness: 12}}});
  }
  ft.push({x: data.best.x, y: data.best.y, text: data.best.text, hovertemplate: hover, mode: "markers", name: "best",
           marker: {symbol: "star", size: 16, color: "#f2b600", line: {color: "#333", width: 1}}});
  const fl = layout(data.recipe ? "generation" : "hops", "score (dev)");
  if (data.recipe) fl.xaxis.dtick = 1;
  Plotly.newPlot("plot-front", ft, fl, config);

  const cols = data.columns, rows = data.rows;
  const textOf = rows.map(r => r.s.join(" ").toLowerCase());
  const thead = document.querySelector("#evals thead tr"), tbody = document.querySelector("#evals tbody");
  const filter = document.getElementById("filter"), only = document.getElementById("only-front");
  const count = document.getElementById("count");
  let order = rows.map((_, i) => i), sortCol = 0, sortDir = 1;
  function esc(s) {
    return String(s).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
  }
  cols.forEach((c, j) => {
    const th = document.createElement("th");
    th.textContent = c.label;
    if (c.num) th.className = "num";
    th.addEventListener("click", () => {
      sortDir = sortCol === j ? -sortDir : 1;
      sortCol = j;
      sort();
      draw();
    });
    thead.appendChild(th);
  });
  function cmp(a, b) {
    const x = rows[a].v[sortCol], y = rows[b].v[sortCol];
    const nx = x === null || x === "", ny = y === null || y === "";
    if (nx || ny) return nx === ny ? a - b : (nx ? 1 : -1);
    const d = cols[sortCol].num ? x - y : String(x).localeCompare(String(y));
    return d === 0 ? a - b : sortDir * d;
  }
  function sort() {
    order.sort(cmp);
    thead.querySelectorAll("th").forEach((th, j) => {
      th.classList.toggle("asc", j === sortCol && sortDir === 1);
      th.classList.toggle("desc", j === sortCol && sortDir === -1);
    });
  }
  function draw() {
    const words = filter.value.toLowerCase().split(/\s+/).filter(Boolean);
    const parts = [];
    let shown = 0;
    for (const i of order) {
      const r = rows[i];
      if (only.checked && !/front|best/.test(r.c)) continue;
      if (!words.every(w => textOf[i].includes(w))) continue;
      shown++;
      parts.push("<tr class='" + r.c + "'>" + r.s.map((s, j) =>
        "<td class='" + (cols[j].num ? "num" : "text") + "'>" + esc(s) + "</td>").join("") + "</tr>");
    }
    tbody.innerHTML = parts.join("");
    count.textContent = "showing " + shown + " of " + rows.length + " evaluations";
  }
  filter.addEventListener("input", draw);
  only.addEventListener("change", draw);
  sort();
  draw();
  document.body.dataset.ready = "1";
})();
