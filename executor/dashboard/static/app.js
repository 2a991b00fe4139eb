// Retry dashboard: live refresh of the page's #live region, and confirmation dialogs.
// No dependencies; everything inserted into the page was rendered (and escaped) by the server.
(() => {
  "use strict";

  const live = document.getElementById("live");
  const statusEl = document.getElementById("live-status");
  const toggle = document.getElementById("live-toggle");
  const dialog = document.getElementById("confirm-dialog");
  const refreshMs = Math.max(1, Number(document.body.dataset.refresh) || 5) * 1000;

  let paused = false;
  let inFlight = false;
  let failures = 0;
  let timer = null;

  function setStatus(text, tone) {
    if (!statusEl) return;
    statusEl.hidden = false;
    statusEl.textContent = text;
    statusEl.dataset.tone = tone;
  }

  function schedule() {
    clearTimeout(timer);
    const backoff = Math.min(2 ** failures, 12);
    timer = setTimeout(refresh, refreshMs * backoff);
  }

  function userIsBusy() {
    if (dialog && dialog.open) return true;
    const active = document.activeElement;
    if (active && live.contains(active) && active.matches("input, select, textarea")) return true;
    const selection = window.getSelection();
    return Boolean(selection && !selection.isCollapsed && live.contains(selection.anchorNode));
  }

  function detailsKey(details) {
    const row = details.closest("tr");
    const anchor = row && row.querySelector("a[href]");
    const rowKey = row ? row.id || (anchor && anchor.getAttribute("href")) || "" : "";
    const summary = details.querySelector("summary");
    const siblings = row ? Array.from(row.querySelectorAll("details")) : [];
    return `${rowKey}|${summary ? summary.textContent : ""}|${siblings.indexOf(details)}`;
  }

  async function refresh() {
    if (!live || paused) return;
    if (document.hidden || inFlight || userIsBusy()) {
      schedule();
      return;
    }
    inFlight = true;
    try {
      const response = await fetch(live.dataset.liveUrl, {
        headers: { "X-Live-Fragment": "1" },
        credentials: "same-origin",
        cache: "no-store",
      });
      if (response.status === 401) {
        paused = true;
        setStatus("Session expired: reload to log in", "bad");
        return;
      }
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      const html = await response.text();
      if (paused || userIsBusy()) return;
      const open = new Set(Array.from(live.querySelectorAll("details[open]"), detailsKey));
      live.innerHTML = html;
      live.querySelectorAll("details").forEach((d) => {
        if (open.has(detailsKey(d))) d.open = true;
      });
      wireForms(live);
      failures = 0;
      setStatus(`Live · ${new Date().toLocaleTimeString()}`, "ok");
    } catch (err) {
      failures += 1;
      setStatus("Offline: retrying", "bad");
    } finally {
      inFlight = false;
      if (!paused) schedule();
    }
  }

  function ask(message, withReason, danger) {
    return new Promise((resolve) => {
      if (!dialog || typeof dialog.showModal !== "function") {
        resolve(window.confirm(message) ? { reason: "" } : null);
        return;
      }
      document.getElementById("confirm-message").textContent = message;
      const wrap = document.getElementById("confirm-reason-wrap");
      const reason = document.getElementById("confirm-reason");
      const ok = document.getElementById("confirm-ok");
      wrap.hidden = !withReason;
      reason.value = "";
      ok.className = danger ? "btn btn-danger" : "btn btn-primary";
      dialog.returnValue = "";
      dialog.addEventListener(
        "close",
        () => resolve(dialog.returnValue === "confirm" ? { reason: reason.value } : null),
        { once: true },
      );
      dialog.showModal();
      (withReason ? reason : ok).focus();
    });
  }

  function lock(form) {
    paused = true; // the page is about to change; keep the clicked form in place
    form.querySelectorAll("button[type=submit]").forEach((b) => {
      b.disabled = true;
      b.textContent = "Working…";
    });
  }

  function wireForms(root) {
    root.querySelectorAll("form[data-confirm]").forEach((form) => {
      if (form.dataset.wired) return;
      form.dataset.wired = "1";
      form.addEventListener("submit", (event) => {
        const confirmed = form.querySelector("input[name=confirmed]");
        if (confirmed && confirmed.value === "1") {
          lock(form);
          return;
        }
        event.preventDefault();
        const danger = Boolean(form.querySelector(".btn-danger"));
        ask(form.dataset.confirm, form.dataset.reason === "1", danger).then((answer) => {
          if (!answer) return;
          if (confirmed) confirmed.value = "1";
          const reasonField = form.querySelector("input[name=reason]");
          if (reasonField) reasonField.value = answer.reason || "";
          lock(form);
          form.submit();
        });
      });
    });
    root.querySelectorAll("button[data-once]").forEach((button) => {
      const form = button.form;
      if (!form || form.dataset.wired) return;
      form.dataset.wired = "1";
      form.addEventListener("submit", () => lock(form));
    });
  }

  wireForms(document);

  if (live && live.dataset.liveUrl) {
    if (toggle) {
      toggle.hidden = false;
      toggle.addEventListener("click", () => {
        paused = !paused;
        toggle.textContent = paused ? "Resume updates" : "Pause updates";
        if (paused) {
          clearTimeout(timer);
          setStatus("Updates paused", "muted");
        } else {
          failures = 0;
          refresh();
        }
      });
    }
    setStatus(`Live · every ${refreshMs / 1000}s`, "ok");
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden && !paused) refresh();
    });
    schedule();
  }

  document.addEventListener("keydown", (event) => {
    if (event.key !== "/" || event.target.matches("input, textarea, select")) return;
    const first = document.querySelector(".filters input:not([type=hidden])");
    if (first) {
      event.preventDefault();
      first.focus();
    }
  });
})();
