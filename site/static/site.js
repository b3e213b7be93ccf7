// Theme toggle (remembered in localStorage) and the phone-width nav button. No framework.
(function () {
  var root = document.documentElement;
  var toggle = document.querySelector(".theme-toggle");
  if (toggle) toggle.addEventListener("click", function () {
    var dark = root.dataset.theme ? root.dataset.theme === "dark" : matchMedia("(prefers-color-scheme: dark)").matches;
    root.dataset.theme = dark ? "light" : "dark";
    try { localStorage.setItem("skillbook-theme", root.dataset.theme); } catch (e) { /* private mode */ }
  });
  var nav = document.querySelector(".nav-toggle");
  if (nav) nav.addEventListener("click", function () { document.body.classList.toggle("nav-open"); });
  document.addEventListener("keydown", function (ev) {
    var box = document.querySelector(".top-search input, #search-input");
    if (ev.key === "/" && box && document.activeElement !== box && !/input|textarea/i.test(document.activeElement.tagName)) {
      ev.preventDefault(); box.focus();
    }
  });
})();

// A "copy" button on every code block (copies the text, not the highlighting).
(function () {
  if (!navigator.clipboard) return;
  document.querySelectorAll(".code").forEach(function (box) {
    var head = box.querySelector(".code-head"), pre = box.querySelector("pre");
    if (!head || !pre || box.classList.contains("source")) return;
    var btn = document.createElement("button");
    btn.type = "button"; btn.className = "copy"; btn.textContent = "copy";
    btn.addEventListener("click", function () {
      navigator.clipboard.writeText(pre.innerText).then(function () {
        btn.textContent = "copied"; setTimeout(function () { btn.textContent = "copy"; }, 1500);
      });
    });
    head.appendChild(btn);
  });
})();
