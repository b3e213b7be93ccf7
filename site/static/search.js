// Search over the prebuilt index (static/search-index.js sets window.SKILLBOOK_INDEX): every word of the
// query must match a skill's name, description or headings; name hits rank first. ?q=word runs on load.
(function () {
  var entries = (window.SKILLBOOK_INDEX || { entries: [] }).entries;
  var input = document.getElementById("search-input");
  var list = document.getElementById("search-results");
  var status = document.getElementById("search-status");
  var base = "";  // search.html sits at the site root, so index URLs work as they are

  function words(text) { return text.toLowerCase().split(/[^a-z0-9+#.]+/).filter(Boolean); }

  function score(entry, terms) {
    // a reference's name ("skill: title") counts like a description, so skills rank above their references
    var ref = entry.kind === "reference";
    var name = ref ? "" : entry.name.toLowerCase();
    var desc = ((ref ? entry.name + " " : "") + entry.title + " " + entry.description).toLowerCase();
    var heads = entry.headings.map(function (h) { return h[0].toLowerCase(); });
    var total = 0, hits = [];
    for (var i = 0; i < terms.length; i++) {
      var t = terms[i], s = 0;
      if (name.indexOf(t) >= 0) s += name === t ? 20 : 10;
      if (desc.indexOf(t) >= 0) s += 4;
      heads.forEach(function (h, j) { if (h.indexOf(t) >= 0) { s += 2; if (hits.indexOf(j) < 0) hits.push(j); } });
      if (!s) return null;  // every word must match somewhere
      total += s;
    }
    if (entry.kind === "skill") total += 3;
    return { entry: entry, score: total, heads: hits.slice(0, 4) };
  }

  function mark(text, terms) {
    var span = document.createElement("span"), lower = text.toLowerCase(), pos = 0;
    while (pos < text.length) {
      var next = -1, len = 0;
      terms.forEach(function (t) { var k = lower.indexOf(t, pos); if (k >= 0 && (next < 0 || k < next)) { next = k; len = t.length; } });
      if (next < 0) { span.appendChild(document.createTextNode(text.slice(pos))); break; }
      span.appendChild(document.createTextNode(text.slice(pos, next)));
      var m = document.createElement("mark"); m.textContent = text.slice(next, next + len); span.appendChild(m);
      pos = next + len;
    }
    return span;
  }

  function render(query) {
    var terms = words(query);
    list.textContent = "";
    if (!terms.length) { status.textContent = "Type a word from a skill's name, description or headings."; return; }
    var found = entries.map(function (e) { return score(e, terms); }).filter(Boolean)
      .sort(function (a, b) { return b.score - a.score || a.entry.name.localeCompare(b.entry.name); });
    status.textContent = found.length ? found.length + " result" + (found.length > 1 ? "s" : "") + " for “" + query + "”"
                                      : "Nothing matches “" + query + "”. Try a shorter word.";
    found.forEach(function (hit) {
      var e = hit.entry, li = document.createElement("li");
      li.className = "hit hit-" + e.kind;
      li.dataset.name = e.name;
      var a = document.createElement("a");
      a.className = "hit-title"; a.href = base + e.url; a.appendChild(mark(e.name, terms));
      li.appendChild(a);
      var kind = document.createElement("span"); kind.className = "hit-kind"; kind.textContent = e.kind === "skill" ? e.stage : e.kind;
      li.appendChild(kind);
      var p = document.createElement("p"); p.className = "hit-desc"; p.appendChild(mark(e.description, terms));
      li.appendChild(p);
      if (hit.heads.length) {
        var hs = document.createElement("p"); hs.className = "hit-heads";
        hit.heads.forEach(function (j) {
          var h = e.headings[j], ha = document.createElement("a");
          ha.href = base + h[1]; ha.appendChild(mark(h[0], terms)); hs.appendChild(ha);
        });
        li.appendChild(hs);
      }
      list.appendChild(li);
    });
  }

  var q = new URLSearchParams(location.search).get("q") || "";
  input.value = q;
  render(q);
  input.addEventListener("input", function () {
    render(input.value);
    var url = new URL(location.href);
    if (input.value) url.searchParams.set("q", input.value); else url.searchParams.delete("q");
    try { history.replaceState(null, "", url); } catch (e) { /* file:// in some browsers */ }
  });
  document.getElementById("search-form").addEventListener("submit", function (ev) { ev.preventDefault(); render(input.value); });
})();
