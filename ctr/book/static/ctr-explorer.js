/* ctr attention explorer: draws every <div class="ctr-explorer"> written by ctr/book/explorer.py.
 * No dependencies, no network: the data sits in the page (deflated, base64), the browser's own
 * DecompressionStream inflates it. Layout: controls, sink scores alpha (bars, eps line, sinks in
 * red), attention map (rows = queries, columns = keys; above the diagonal, where causality masks
 * the map, sink columns are tinted red), tooltip on hover.
 */
(function () {
  "use strict";
  var HEAT = [[255, 255, 255], [198, 219, 239], [107, 174, 214], [33, 113, 181], [8, 48, 107]];
  var SINK = "#d62728", BAR = "#7f9fbf", MASK = [243, 243, 243];

  function colour(v) {               // v in [0, 1]: sqrt(attention), white -> dark blue
    var x = v * (HEAT.length - 1), i = Math.min(Math.floor(x), HEAT.length - 2), f = x - i;
    var a = HEAT[i], b = HEAT[i + 1];
    return [a[0] + f * (b[0] - a[0]), a[1] + f * (b[1] - a[1]), a[2] + f * (b[2] - a[2])];
  }

  function show(tok) {
    return "\u201c" + String(tok).replace(/\n/g, "\\n").replace(/\t/g, "\\t") + "\u201d";
  }

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  async function inflate(b64) {
    var bin = atob(b64), bytes = new Uint8Array(bin.length);
    for (var i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    var stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate"));
    return new Uint8Array(await new Response(stream).arrayBuffer());
  }

  async function setup(root) {
    var d = JSON.parse(root.querySelector(".ctr-explorer-data").textContent);
    var raw = await inflate(d.blob);
    var L = d.L, H = d.H, T = d.T, n = T * (T + 1) / 2;
    var view = new DataView(raw.buffer, raw.byteOffset, raw.byteLength);
    var aOff = L * H * n;
    function att(l, h, i, j) {          // attention of query i to key j (j <= i), decoded
      return raw[(l * H + h) * n + i * (i + 1) / 2 + j] / 255;
    }
    function alpha(l, h, t) {
      var c = view.getUint16(aOff + 2 * ((l * H + h) * T + t), true);
      return c === 65535 ? NaN : c / 65534;
    }

    var s = Math.max(1, Math.floor(520 / T)), N = s * T, BH = 110;
    root.textContent = "";
    if (d.title) root.appendChild(el("div", "ctr-explorer-title", d.title));
    var controls = el("div", "ctr-explorer-controls");
    var lsel = el("select"), hsel = el("select");
    lsel.setAttribute("aria-label", "layer");
    hsel.setAttribute("aria-label", "head");
    d.layers.forEach(function (ly, i) {
      var o = el("option", null, String(ly)); o.value = String(i); lsel.appendChild(o);
    });
    for (var h = 0; h < H; h++) {
      var o = el("option", null, String(h)); o.value = String(h); hsel.appendChild(o);
    }
    lsel.value = String(d.layer); hsel.value = String(d.head);
    var ll = el("label", null, "layer "); ll.appendChild(lsel);
    var hl = el("label", null, "head "); hl.appendChild(hsel);
    controls.appendChild(ll); controls.appendChild(hl);
    root.appendChild(controls);
    var sinksLine = el("div", "ctr-explorer-sinks");
    root.appendChild(sinksLine);
    var bars = el("canvas", "ctr-explorer-bars"), heat = el("canvas", "ctr-explorer-heat");
    bars.width = N; bars.height = BH; heat.width = N; heat.height = N;
    var plot = el("div", "ctr-explorer-plot");
    plot.appendChild(el("div", "ctr-explorer-axis", "sink score \u03b1 of each key (red: sink, \u03b1 > \u03b5)"));
    plot.appendChild(bars);
    plot.appendChild(el("div", "ctr-explorer-axis", "attention: rows = queries (top to bottom), columns = keys (left to right); sink columns tinted red above the diagonal"));
    plot.appendChild(heat);
    root.appendChild(plot);
    var tip = el("div", "ctr-explorer-tip");
    root.appendChild(tip);

    function current() { return [parseInt(lsel.value, 10), parseInt(hsel.value, 10)]; }

    function draw() {
      var lh = current(), l = lh[0], hh = lh[1];
      var sinks = [];
      for (var t = 0; t < T; t++) if (alpha(l, hh, t) > d.eps) sinks.push(t);
      // attention map
      var ctx = heat.getContext("2d"), img = ctx.createImageData(N, N), px = img.data;
      for (var i = 0; i < T; i++) {
        for (var j = 0; j < T; j++) {
          var c = j <= i ? colour(Math.sqrt(att(l, hh, i, j))) : MASK;
          for (var y = i * s; y < (i + 1) * s; y++) {
            for (var x = j * s; x < (j + 1) * s; x++) {
              var k = 4 * (y * N + x);
              px[k] = c[0]; px[k + 1] = c[1]; px[k + 2] = c[2]; px[k + 3] = 255;
            }
          }
        }
      }
      ctx.putImageData(img, 0, 0);
      ctx.fillStyle = "rgba(214, 39, 40, 0.35)";     // sink columns: tint their masked part
      sinks.forEach(function (t) { ctx.fillRect(t * s, 0, s, t * s); });
      // sink scores
      var b = bars.getContext("2d"), top = 8, hgt = BH - top - 2;
      b.clearRect(0, 0, N, BH);
      b.fillStyle = "#fafafa"; b.fillRect(0, top, N, hgt);
      for (var t2 = 0; t2 < T; t2++) {
        var a = alpha(l, hh, t2);
        if (isNaN(a)) { b.fillStyle = "#e4e4e4"; b.fillRect(t2 * s, top, s, hgt); continue; }
        b.fillStyle = a > d.eps ? SINK : BAR;
        var bh = Math.max(1, a * hgt);
        b.fillRect(t2 * s, top + hgt - bh, Math.max(s - (s > 2 ? 1 : 0), 1), bh);
      }
      var ye = top + hgt - d.eps * hgt;
      b.strokeStyle = "#333"; b.setLineDash([4, 3]); b.beginPath();
      b.moveTo(0, ye + 0.5); b.lineTo(N, ye + 0.5); b.stroke(); b.setLineDash([]);
      b.fillStyle = "#333"; b.font = "11px sans-serif";
      b.fillText("\u03b5 = " + d.eps, N - 52, ye - 3);
      sinksLine.textContent = "Layer " + d.layers[l] + ", head " + hh + ": " + (sinks.length ?
        sinks.length + " sink" + (sinks.length > 1 ? "s" : "") + " (\u03b1 > \u03b5 = " + d.eps + "): " +
        sinks.map(function (t) { return show(d.tokens[t]) + " at " + t + " (\u03b1 = " + alpha(l, hh, t).toFixed(2) + ")"; }).join(", ")
        : "no sink (no \u03b1 above \u03b5 = " + d.eps + ")");
      root.dataset.view = d.layers[l] + "," + hh;
    }

    function at(canvas, ev) {
      var r = canvas.getBoundingClientRect();
      return [Math.floor((ev.clientX - r.left) * canvas.width / r.width / s),
              Math.floor((ev.clientY - r.top) * canvas.height / r.height / s)];
    }
    function place(ev, text) {
      tip.textContent = text; tip.style.display = "block";
      var r = root.getBoundingClientRect();
      tip.style.left = (ev.clientX - r.left + 14) + "px";
      tip.style.top = (ev.clientY - r.top + 14) + "px";
    }
    heat.addEventListener("mousemove", function (ev) {
      var p = at(heat, ev), j = p[0], i = p[1], lh = current();
      if (i < 0 || j < 0 || i >= T || j >= T) return;
      place(ev, j > i ? "query " + i + " " + show(d.tokens[i]) + " cannot see the later key " + j
        : "query " + i + " " + show(d.tokens[i]) + " \u2192 key " + j + " " + show(d.tokens[j]) +
          ": attention \u2248 " + att(lh[0], lh[1], i, j).toFixed(3));
    });
    bars.addEventListener("mousemove", function (ev) {
      var t = at(bars, ev)[0], lh = current();
      if (t < 0 || t >= T) return;
      var a = alpha(lh[0], lh[1], t);
      place(ev, "key " + t + " " + show(d.tokens[t]) + ": " + (isNaN(a)
        ? "no score (fewer than " + d.min_queries + " queries see it)"
        : "\u03b1 = " + a.toFixed(3) + (a > d.eps ? " (sink)" : "")));
    });
    [heat, bars].forEach(function (c) {
      c.addEventListener("mouseleave", function () { tip.style.display = "none"; });
    });
    lsel.addEventListener("change", draw);
    hsel.addEventListener("change", draw);
    draw();
    root.dataset.ready = "1";
  }

  function init() {
    var all = document.querySelectorAll(".ctr-explorer:not([data-ready])");
    Array.prototype.forEach.call(all, function (root) {
      setup(root).catch(function (err) {
        root.dataset.error = String(err);
        root.appendChild(el("p", "ctr-explorer-error", "The explorer could not be drawn: " + err));
      });
    });
  }

  window.ctrExplorer = {init: init};
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
