// Search over the prebuilt index (static/search-index.js sets window.SKILLBOOK_INDEX). A whole request is
// ranked the way `skills search` ranks it (BM25 weights exported by skillbook.catalog.search), so the best
// skills come first; then the pages where every word of the query matches a name, description or heading
// (references, headings). ?q=words runs on load.
(function () {
  var index = window.SKILLBOOK_INDEX || { entries: [] };
  var entries = index.entries, ranking = index.ranking;
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

  // skills search's tokens(): lowercase words, compounds (top_p) as parts plus the joined form, no
  // stopwords or 1-letter parts, each part mapped to its stem through the exported forms
  var WORD = /[a-z0-9]+(?:[._:\/+-][a-z0-9]+)*/g;
  var stop = ranking ? new Set(ranking.stopwords) : new Set();
  function tokens(text) {
    var out = [], m;
    WORD.lastIndex = 0;
    while ((m = WORD.exec(text.toLowerCase()))) {
      var word = m[0], parts = word.split(/[._:\/+-]/).filter(Boolean);
      if (parts.length > 1) out.push([word, parts.join("")]);
      parts.forEach(function (part) {
        if (stop.has(part) || part.length < 2) return;
        out.push([parts.length === 1 ? word : part, ranking.forms[part] || part]);
      });
    }
    return out;
  }

  // skills search's Index.search(): summed BM25 weights, the name bonus, coverage, the "no skill" rule
  function rank(query) {
    if (!ranking) return { hits: [], weak: true };
    var pairs = tokens(query), weight = {}, total = 0, n = ranking.entries.length;
    pairs.forEach(function (p) { weight[p[1]] = p[1] in ranking.idf ? ranking.idf[p[1]] : ranking.unknown_idf; });
    Object.keys(weight).forEach(function (t) { total += weight[t]; });
    total = total || 1;
    var known = pairs.filter(function (p) { return p[1] in ranking.weights; });
    var scores = new Array(n).fill(0), has = {};
    known.forEach(function (p) {
      ranking.weights[p[1]].forEach(function (iv) { scores[iv[0]] += iv[1]; });
    });
    Object.keys(weight).forEach(function (t) {
      has[t] = new Set((ranking.weights[t] || []).map(function (iv) { return iv[0]; }));
    });
    var asked = new Set(known.map(function (p) { return p[1]; }));
    ranking.name_terms.forEach(function (terms, i) {
      if (known.length && terms.every(function (t) { return asked.has(t); })) scores[i] += ranking.name_bonus;
    });
    var order = scores.map(function (s, i) { return i; }).filter(function (i) { return scores[i] > 0; })
      .sort(function (a, b) { return scores[b] - scores[a] || ranking.entries[a].name.localeCompare(ranking.entries[b].name); });
    var hits = order.slice(0, 5).map(function (i) {
      var cover = 0, matched = [];
      Object.keys(weight).forEach(function (t) { if (has[t].has(i)) cover += weight[t]; });
      known.forEach(function (p) { if (has[p[1]].has(i) && matched.indexOf(p[0]) < 0) matched.push(p[0]); });
      return { name: ranking.entries[i].name, kind: ranking.entries[i].kind, score: scores[i], coverage: cover / total, matched: matched };
    });
    var weak = !hits.length || hits[0].score < ranking.no_skill_below || hits[0].coverage < ranking.min_coverage;
    return { hits: hits, weak: weak };
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

  function hitItem(e, terms, heads, note) {
    var li = document.createElement("li");
    li.className = "hit hit-" + e.kind;
    li.dataset.name = e.name;
    var a = document.createElement("a");
    a.className = "hit-title"; a.href = base + e.url; a.appendChild(mark(e.name, terms));
    li.appendChild(a);
    var kind = document.createElement("span"); kind.className = "hit-kind"; kind.textContent = e.kind === "skill" ? e.stage : e.kind;
    li.appendChild(kind);
    if (note) { var n = document.createElement("span"); n.className = "hit-why"; n.textContent = note; li.appendChild(n); }
    var p = document.createElement("p"); p.className = "hit-desc"; p.appendChild(mark(e.description, terms));
    li.appendChild(p);
    if (heads.length) {
      var hs = document.createElement("p"); hs.className = "hit-heads";
      heads.forEach(function (j) {
        var h = e.headings[j], ha = document.createElement("a");
        ha.href = base + h[1]; ha.appendChild(mark(h[0], terms)); hs.appendChild(ha);
      });
      li.appendChild(hs);
    }
    return li;
  }

  function render(query) {
    var terms = words(query);
    list.textContent = "";
    if (!terms.length) { status.textContent = "Type a request, or a word from a skill's name, description or headings."; return; }
    var ranked = rank(query), shown = new Set(), count = 0;
    if (!ranked.weak) {
      ranked.hits.forEach(function (h) {
        var e = entries.find(function (x) { return x.kind === h.kind && x.name === h.name; });
        if (!e) return;
        shown.add(e.url);
        count++;
        list.appendChild(hitItem(e, terms, [], "score " + h.score.toFixed(2) + " · matched: " + h.matched.join(", ")));
      });
    }
    var found = entries.map(function (e) { return score(e, terms); }).filter(Boolean)
      .filter(function (hit) { return !shown.has(hit.entry.url); })
      .sort(function (a, b) { return b.score - a.score || a.entry.name.localeCompare(b.entry.name); });
    found.forEach(function (hit) { count++; list.appendChild(hitItem(hit.entry, terms, hit.heads, "")); });
    status.textContent = count ? count + " result" + (count > 1 ? "s" : "") + " for “" + query + "”"
                               : (ranked.weak && ranked.hits.length ? "No skill serves “" + query + "” well. " : "Nothing matches “" + query + "”. ")
                                 + "Try other words.";
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
