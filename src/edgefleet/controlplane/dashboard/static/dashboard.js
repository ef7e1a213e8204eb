// edgefleet dashboard: the only script. Confirms destructive buttons and offers an opt-in auto-refresh.
// Pages work without it (plain forms and links).
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  for (const form of document.querySelectorAll("form[data-confirm]")) {
    form.addEventListener("submit", (ev) => {
      if (!window.confirm(form.dataset.confirm)) ev.preventDefault();
    });
  }
  const box = document.getElementById("autorefresh");
  if (!box) return;
  const KEY = "edgefleet.autorefresh";
  box.checked = window.localStorage.getItem(KEY) === "1";
  let timer = null;
  const arm = () => {
    if (timer) window.clearTimeout(timer);
    timer = box.checked ? window.setTimeout(() => window.location.reload(), 10000) : null;
  };
  box.addEventListener("change", () => {
    window.localStorage.setItem(KEY, box.checked ? "1" : "0");
    arm();
  });
  arm();
});
