// cutover ui: the server sends the page's main part again when it
// changes (server-sent events); it is merged into the page in place, so
// what the operator is pointing at, or has opened, stays. Actions ask
// before they post.
"use strict";

// Makes `from`'s children what `to`'s are, keeping every element whose
// tag (and id, where it has one) is unchanged at its place.
function morphChildren(from, to) {
  const next = [...to.childNodes];
  const laterIds = new Set(next.filter((n) => n.id).map((n) => n.id));
  next.forEach((node, i) => {
    laterIds.delete(node.id);
    let old = from.childNodes[i];
    if (node.id && (!old || old.id !== node.id)) {
      const keyed = [...from.children].find((c) => c.id === node.id);
      if (keyed) {
        from.insertBefore(keyed, old || null);
        old = keyed;
      }
    }
    if (!old) {
      from.appendChild(node);
    } else if (old.id && old.id !== node.id && laterIds.has(old.id)) {
      // A keyed element that comes later stays for its turn.
      from.insertBefore(node, old);
    } else if (old.nodeType !== node.nodeType || old.nodeName !== node.nodeName || (old.id || "") !== (node.id || "")) {
      from.replaceChild(node, old);
    } else if (node.nodeType === Node.ELEMENT_NODE) {
      morph(old, node);
    } else if (old.nodeValue !== node.nodeValue) {
      old.nodeValue = node.nodeValue;
    }
  });
  while (from.childNodes.length > next.length) from.removeChild(from.lastChild);
}

function morph(from, to) {
  for (const { name } of [...from.attributes]) {
    // A section the operator opened stays open.
    const opened = name === "open" && from.nodeName === "DETAILS";
    if (!to.hasAttribute(name) && !opened) from.removeAttribute(name);
  }
  for (const { name, value } of [...to.attributes]) {
    if (from.getAttribute(name) !== value) from.setAttribute(name, value);
  }
  morphChildren(from, to);
}

const main = document.getElementById("main");
const live = document.getElementById("live");

// A browser gives a site six connections: only a page in view holds a
// stream. A hidden tab, or a page left for another (kept in the
// back/forward cache), lets its stream go, and gets the page as it is now
// when it is back.
let source = null;

function connect() {
  if (source || !main || !main.dataset.live || !window.EventSource) return;
  source = new EventSource(main.dataset.live);
  source.addEventListener("page", (event) => {
    const next = document.createElement("template");
    next.innerHTML = event.data;
    morphChildren(main, next.content);
    live.className = "live on";
  });
  source.addEventListener("open", () => { live.className = "live on"; });
  // The browser reconnects by itself; the badge says the page may be old.
  source.addEventListener("error", () => { live.className = "live off"; });
}

function disconnect() {
  if (!source) return;
  source.close();
  source = null;
  live.className = "live";
}

document.addEventListener("visibilitychange", () => (document.hidden ? disconnect() : connect()));
window.addEventListener("pagehide", disconnect);
window.addEventListener("pageshow", () => { if (!document.hidden) connect(); });
if (!document.hidden) connect();

// The dialog names an action; what confirming posts is what it named,
// taken when it opened: the page may change under it meanwhile.
const dialog = document.getElementById("confirm");
document.addEventListener("submit", (event) => {
  const form = event.target;
  if (!form.dataset.confirm || !dialog) return;
  event.preventDefault();
  const asked = { action: form.getAttribute("action"), fields: [...new FormData(form)] };
  dialog.querySelector(".question").textContent = form.dataset.confirm;
  dialog.returnValue = "";
  dialog.onclose = () => {
    if (dialog.returnValue !== "ok") return;
    const post = document.createElement("form");
    post.method = "post";
    post.action = asked.action;
    for (const [name, value] of asked.fields) {
      const field = document.createElement("input");
      field.type = "hidden";
      field.name = name;
      field.value = value;
      post.appendChild(field);
    }
    document.body.appendChild(post);
    post.submit();
  };
  dialog.showModal();
});
