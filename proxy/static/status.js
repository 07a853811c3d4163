// The status page's behaviour: search and sort the cached images, and refresh
// the live figures every 10 seconds (the page works without it).
"use strict";

(function () {
  const table = document.getElementById("images");
  const search = document.getElementById("search");
  const none = document.getElementById("no-match");
  const body = table.tBodies[0];

  function filter() {
    const words = search.value.toLowerCase().split(/\s+/).filter(Boolean);
    let shown = 0;
    for (const row of body.rows) {
      const name = row.dataset.image;
      const match = words.every((w) => name.includes(w));
      row.hidden = !match;
      if (match) shown += 1;
    }
    none.hidden = shown > 0 || body.rows.length === 0;
  }

  function sort(button) {
    const key = button.dataset.sort;
    const numeric = button.hasAttribute("data-numeric");
    const ascending = button.getAttribute("aria-sort") !== "ascending";
    for (const other of table.querySelectorAll("th button")) other.removeAttribute("aria-sort");
    button.setAttribute("aria-sort", ascending ? "ascending" : "descending");
    const rows = Array.from(body.rows);
    rows.sort((a, b) => {
      const x = a.dataset[key], y = b.dataset[key];
      const order = numeric ? Number(x) - Number(y) : x.localeCompare(y);
      return ascending ? order : -order;
    });
    body.append(...rows);
  }

  search.addEventListener("input", filter);
  for (const button of table.querySelectorAll("th button")) {
    button.addEventListener("click", () => sort(button));
  }

  // Replace the live part with a fresh rendering; the images list keeps its
  // search and order (it changes at most every 30 seconds anyway).
  async function refresh() {
    try {
      const response = await fetch("/?part=live", { credentials: "same-origin" });
      if (!response.ok) return;
      const fresh = new DOMParser().parseFromString(await response.text(), "text/html");
      const live = fresh.getElementById("live");
      const stamp = fresh.getElementById("generated");
      if (live) document.getElementById("live").replaceWith(document.adoptNode(live));
      if (stamp) document.getElementById("generated").replaceWith(document.adoptNode(stamp));
    } catch (e) {
      // The mirror is restarting or the network is gone: try again later.
    }
  }
  window.setInterval(refresh, 10000);
  window.pullthroughRefresh = refresh; // for tests: refresh now
})();
