// The patient's feed: rate (ml/h) and volume delivered against the prescribed dose (ml) over
// time, pump states as bands behind, alarms as labelled markers. The data is the page's
// <script type="application/json" id="chart-data"> (written by the server), never inline code.
(function () {
  "use strict";
  var el = document.getElementById("feed");
  if (!el || !window.Chart) { return; }
  var labels = JSON.parse(document.getElementById("chart-labels").textContent);
  var data = JSON.parse(document.getElementById("chart-data").textContent);
  var BAND = {running: "rgba(46,125,50,.12)", paused: "rgba(249,168,37,.2)",
    standby: "rgba(120,120,120,.12)", priming: "rgba(21,101,192,.1)",
    flush: "rgba(21,101,192,.16)", dose_complete: "rgba(21,101,192,.24)",
    alarm_hold: "rgba(198,40,40,.22)"};
  var fmt = new Intl.DateTimeFormat(labels.locale, {hour: "2-digit", minute: "2-digit", timeZone: labels.tz,
    day: "2-digit", month: "2-digit"});

  function datasets(d) {
    return [
      {label: labels.rate, yAxisID: "rate", borderColor: "#2e7d32", pointRadius: 0,
        stepped: true, borderWidth: 2,
        data: d.points.map(function (p) { return {x: p[0], y: p[1]}; })},
      {label: labels.volume, yAxisID: "volume", borderColor: "#1565c0", pointRadius: 0,
        borderWidth: 2, data: d.points.map(function (p) { return {x: p[0], y: p[2]}; })},
      {label: labels.dose, yAxisID: "volume", borderColor: "#1565c0", borderDash: [6, 4],
        pointRadius: 0, borderWidth: 1, stepped: true,
        data: d.dose.map(function (p) { return {x: p[0], y: p[1]}; })},
      {label: labels.alarm, yAxisID: "rate", type: "scatter", pointStyle: "triangle",
        pointRadius: 8, backgroundColor: "#c62828", borderColor: "#c62828",
        data: d.alarms.map(function (a) { return {x: a[0], y: 0, word: a[1]}; })}
    ];
  }

  var bands = {
    id: "stateBands",
    beforeDatasetsDraw: function (chart) {
      var x = chart.scales.x, area = chart.chartArea, ctx = chart.ctx;
      ((chart.$serene || data).bands || []).forEach(function (b) {
        var a = Math.max(x.getPixelForValue(b[0]), area.left);
        var e = Math.min(x.getPixelForValue(b[1]), area.right);
        if (e <= a) { return; }
        ctx.save(); ctx.fillStyle = BAND[b[2]] || "rgba(0,0,0,.05)";
        ctx.fillRect(a, area.top, e - a, area.bottom - area.top); ctx.restore();
      });
    },
    afterDatasetsDraw: function (chart) {
      var x = chart.scales.x, area = chart.chartArea, ctx = chart.ctx;
      ctx.save(); ctx.fillStyle = "#8b0000"; ctx.font = "12px sans-serif";
      ((chart.$serene || data).alarms || []).forEach(function (a, i) {
        var px = x.getPixelForValue(a[0]);
        if (px < area.left || px > area.right) { return; }
        ctx.fillText(a[1], Math.min(px + 6, area.right - 120), area.bottom - 14 - 14 * (i % 3));
      });
      ctx.restore();
    }
  };

  var chart = new window.Chart(el, {
    type: "line",
    data: {datasets: datasets(data)},
    plugins: [bands],
    options: {
      animation: false, maintainAspectRatio: false, parsing: true, normalized: true,
      interaction: {mode: "nearest", intersect: false},
      scales: {
        x: {type: "linear", min: data.t0, max: data.t1,
          ticks: {callback: function (v) { return fmt.format(new Date(v)); }, maxTicksLimit: 10}},
        rate: {position: "left", beginAtZero: true, title: {display: true, text: labels.rate}},
        volume: {position: "right", beginAtZero: true, grid: {drawOnChartArea: false},
          title: {display: true, text: labels.volume}}
      },
      plugins: {tooltip: {callbacks: {
        title: function (items) { return items.length ? fmt.format(new Date(items[0].parsed.x)) : ""; },
        label: function (item) {
          if (item.raw && item.raw.word) { return labels.alarm + ": " + item.raw.word; }
          return item.dataset.label + ": " + item.formattedValue;
        }}}}
    }
  });
  chart.$serene = data;
  window.sereneFeed = {
    chart: chart,
    update: function (d) {
      chart.$serene = d;
      chart.options.scales.x.min = d.t0; chart.options.scales.x.max = d.t1;
      var ds = datasets(d);
      chart.data.datasets.forEach(function (old, i) { old.data = ds[i].data; });
      chart.update("none");
    }
  };
  document.body.setAttribute("data-chart-ready", "1");
})();
