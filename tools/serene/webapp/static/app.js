// Live refresh: pages that name a JSON endpoint (body data-live-url) poll it every few
// seconds and replace the #live part with the server-rendered fragment it returns; a page
// without JavaScript is still a plain, complete page. No inline script anywhere (CSP).
(function () {
  "use strict";
  var body = document.body;
  var url = body.getAttribute("data-live-url");
  var every = parseInt(body.getAttribute("data-live-ms") || "5000", 10);
  var lang = document.getElementById("language");
  if (lang) {
    lang.addEventListener("change", function () { lang.form.submit(); });
  }
  if (!url) { return; }
  var status = document.getElementById("live-status");
  function tick() {
    fetch(url, {credentials: "same-origin", headers: {"Accept": "application/json"}})
      .then(function (r) {
        if (r.status === 401) { window.location.reload(); throw new Error("session"); }
        if (!r.ok) { throw new Error("HTTP " + r.status); }
        return r.json();
      })
      .then(function (data) {
        var live = document.getElementById("live");
        if (live && typeof data.html === "string") { live.innerHTML = data.html; }
        if (data.chart && window.sereneFeed) { window.sereneFeed.update(data.chart); }
        if (status) { status.textContent = "↻ " + new Date().toLocaleTimeString(document.documentElement.lang); }
        body.setAttribute("data-live-count", String(1 + parseInt(body.getAttribute("data-live-count") || "0", 10)));
      })
      .catch(function () { if (status) { status.textContent = "⚠"; } })
      .finally(function () { window.setTimeout(tick, every); });
  }
  window.setTimeout(tick, every);
})();
