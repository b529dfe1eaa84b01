/*
 * FleetOps console: live fragments. Plain script, no build step, no dependencies.
 *
 * Markup it drives (stable hooks for tests and operators):
 *   <div data-live="dashboard-card-indexer"            unique name of the live region
 *        data-live-url="/admin/live/card/indexer/"     fragment URL (same partial the page rendered)
 *        data-live-interval="10">                      seconds between refreshes (minimum 2)
 *     ... fragment markup, which carries its own status line:
 *     <span data-live-status data-live-at="12:03:04">updated 12:03:04</span>
 *   </div>
 *
 * Live regions on the pages: dashboard-card-<card key> (admin index), curtailment-event,
 * keys-changelist, protocol, chain.
 *
 * Behaviour:
 *   - every data-live-interval seconds the fragment is fetched and swapped into the region's
 *     innerHTML; the response must carry the header X-FleetOps-Fragment (a login page or an error
 *     page is never swapped in);
 *   - a failed refresh keeps the old content, sets data-live-state="stale" on the region and says
 *     "stale — last update HH:MM:SS" in its status line; the next success clears it;
 *   - while focus is in a field inside the region, or an action checkbox in it is ticked, the swap
 *     is skipped (data-live-state="held") so nothing the operator is doing is lost; open <details>
 *     elements (matched by id or data-live-key) stay open across swaps;
 *   - in a background tab nothing is fetched (Page Visibility API); on return every region refreshes
 *     at once and the timers restart.
 * After each attempt the region gets data-live-refreshed-at (ms since epoch) and the document fires
 * a "fleetops:live" event with detail {name, ok}.
 */
(function () {
  "use strict";

  var MIN_INTERVAL = 2;
  var regions = [];

  function statusOf(el) {
    return el.querySelector("[data-live-status]");
  }

  function markStale(el, why) {
    el.setAttribute("data-live-state", "stale");
    el.classList.add("fo-stale");
    var status = statusOf(el);
    if (status) {
      var at = status.getAttribute("data-live-at") || "never";
      status.textContent = "stale — last update " + at + (why ? " (" + why + ")" : "");
      status.classList.add("fo-stale-label");
    }
  }

  function busy(el) {
    var active = document.activeElement;
    if (active && el.contains(active) && /^(INPUT|SELECT|TEXTAREA)$/.test(active.tagName)) {
      return true;
    }
    return el.querySelector("input.action-select:checked, input[data-live-hold]:checked") !== null;
  }

  function openDetails(el) {
    var keys = [];
    el.querySelectorAll("details[open]").forEach(function (d) {
      var key = d.id || d.getAttribute("data-live-key");
      if (key) keys.push(key);
    });
    return keys;
  }

  function reopen(el, keys) {
    keys.forEach(function (key) {
      el.querySelectorAll("details").forEach(function (d) {
        if (d.id === key || d.getAttribute("data-live-key") === key) d.open = true;
      });
    });
  }

  function done(region, ok) {
    region.el.setAttribute("data-live-refreshed-at", String(Date.now()));
    document.dispatchEvent(new CustomEvent("fleetops:live", { detail: { name: region.name, ok: ok } }));
  }

  function refresh(region) {
    if (region.inFlight || document.visibilityState === "hidden") return;
    region.inFlight = true;
    fetch(region.url, {
      credentials: "same-origin",
      redirect: "manual",
      headers: { "X-Requested-With": "fleetops-live" },
      cache: "no-store",
    })
      .then(function (response) {
        if (!response.ok || !response.headers.get("X-FleetOps-Fragment")) {
          throw new Error(response.status ? "HTTP " + response.status : "signed out?");
        }
        return response.text();
      })
      .then(function (html) {
        region.inFlight = false;
        if (busy(region.el)) {
          region.el.setAttribute("data-live-state", "held");
          done(region, true);
          return;
        }
        var keep = openDetails(region.el);
        region.el.innerHTML = html;
        reopen(region.el, keep);
        region.el.setAttribute("data-live-state", "fresh");
        region.el.classList.remove("fo-stale");
        done(region, true);
      })
      .catch(function (error) {
        region.inFlight = false;
        markStale(region.el, error && error.message);
        done(region, false);
      });
  }

  function start(region) {
    stop(region);
    region.timer = window.setInterval(function () {
      refresh(region);
    }, region.interval * 1000);
  }

  function stop(region) {
    if (region.timer) window.clearInterval(region.timer);
    region.timer = null;
  }

  function init() {
    document.querySelectorAll("[data-live-url]").forEach(function (el) {
      var interval = parseFloat(el.getAttribute("data-live-interval") || "10");
      var region = {
        el: el,
        name: el.getAttribute("data-live") || "",
        url: el.getAttribute("data-live-url"),
        interval: Math.max(isFinite(interval) ? interval : 10, MIN_INTERVAL),
        timer: null,
        inFlight: false,
      };
      el.setAttribute("data-live-state", "fresh");
      regions.push(region);
      if (document.visibilityState !== "hidden") start(region);
    });
    document.addEventListener("visibilitychange", function () {
      regions.forEach(function (region) {
        if (document.visibilityState === "hidden") {
          stop(region);
        } else {
          refresh(region);
          start(region);
        }
      });
    });
  }

  window.FleetOpsLive = { regions: regions, refresh: refresh };
  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", init);
  } else {
    init();
  }
})();
