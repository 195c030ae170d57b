"""Interactive flamegraph as one self-contained SVG (also embedded by flamegraph_html).

Boxes are laid out here, so the picture shows without JavaScript; the embedded script
(no external resources) adds zoom on click, a regex search that highlights matching
frames (also read from a `#search=REGEX` URL fragment on load), and a hover tooltip with
the value and its share of the total. Boxes are coloured by module family (libpq,
addon, node, js, libc, other) with a legend; `inverted` draws an icicle (roots on top).
Each box is a nested <svg> so its label is clipped to the box at any zoom.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from xml.sax.saxutils import escape, quoteattr

from tracer.model.snapshot import Snapshot
from tracer.reporters.stacks import (
    ExportOptions,
    function_name,
    module_family,
    weighted_stacks,
)

WIDTH = 1200
PAD = 10
ROW = 16
TOP = 56
LEGEND = 34
LEGEND_CLASSES = 6
FAMILIES = {  # family -> (hue, saturation %, lightness %)
    "libpq": (210, 70, 62), "addon": (28, 85, 60), "node": (120, 45, 52),
    "js": (52, 80, 55), "libc": (0, 70, 64), "other": (270, 22, 68),
}


@dataclass
class _Node:
    name: str
    module: str
    family: str
    value: int = 0
    children: dict[tuple[str, str], _Node] = field(default_factory=dict)
    charged: dict[str, int] = field(default_factory=dict)  # root: value per module class


def _tree(snap: Snapshot, options: ExportOptions) -> _Node:
    root = _Node("all", "", "root")
    for stack in weighted_stacks(snap, options.metric):
        root.value += stack.value
        root.charged[stack.module_class] = root.charged.get(stack.module_class, 0) + stack.value
        node = root
        for f in stack.frames:
            name = f"{function_name(f)} [{f.module_name}]"
            key = (name, f.module)
            child = node.children.get(key)
            if child is None:
                child = node.children[key] = _Node(name, f.module,
                                                   module_family(f.module_class))
            child.value += stack.value
            node = child
    return root


def _depth(node: _Node) -> int:
    return 1 + max((_depth(c) for c in node.children.values()), default=0)


def _colour(node: _Node) -> str:
    if node.family == "root":
        return "hsl(0,0%,78%)"
    hue, sat, light = FAMILIES[node.family]
    jitter = zlib.crc32(node.name.encode()) % 13 - 6  # neighbours stay distinguishable
    return f"hsl({hue},{sat}%,{light + jitter}%)"


def _fmt(n: int) -> str:
    return f"{n:,}"


def render_svg(snap: Snapshot, options: ExportOptions, embedded: bool = False) -> str:
    """The flamegraph's <svg> element; a complete SVG document unless `embedded`."""
    root = _tree(snap, options)
    depth = _depth(root)
    height = TOP + depth * ROW + LEGEND
    unit = options.metric.unit
    title = options.title or f"{snap.command} (PID {snap.pid}): {options.metric.description}"
    total = max(root.value, 1)
    inner = WIDTH - 2 * PAD
    boxes: list[str] = []

    def emit(node: _Node, x: float, d: int) -> None:
        w = node.value / total
        y = TOP + (d if options.inverted else depth - 1 - d) * ROW
        pct = 100.0 * node.value / total
        tip = f"{node.name}\n{_fmt(node.value)} {unit} ({pct:.2f}%)"
        boxes.append(
            f'<g class="frame" data-n={quoteattr(node.name)} data-v="{node.value}" '
            f'data-x="{x:.9f}" data-w="{w:.9f}" data-d="{d}" data-f="{node.family}">'
            f"<title>{escape(tip)}</title>"
            f'<svg x="{PAD + x * inner:.2f}" y="{y}" width="{max(w * inner - 0.5, 0):.2f}" '
            f'height="{ROW - 1}"><rect width="100%" height="100%" rx="2" '
            f'fill="{_colour(node)}"/><text x="3" y="11.5">{escape(node.name)}</text></svg></g>')
        for child in sorted(node.children.values(), key=lambda c: c.name):
            emit(child, x, d + 1)
            x += child.value / total

    emit(root, 0.0, 0)
    legend = _legend(root, height - LEGEND + 10)
    doc = (
        f'<svg id="natrace-flamegraph" xmlns="http://www.w3.org/2000/svg" version="1.1" '
        f'width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" '
        f'data-total="{root.value}" data-unit="{escape(unit)}" data-pad="{PAD}">'
        f"<style>{_CSS}</style>"
        f'<rect width="100%" height="100%" fill="#fbfbf6"/>'
        f'<text class="title" x="{WIDTH / 2}" y="20" text-anchor="middle">{escape(title)}</text>'
        f'<text class="sub" x="{WIDTH / 2}" y="38" text-anchor="middle">total '
        f"{_fmt(root.value)} {escape(unit)}; click a frame to zoom, Search to highlight</text>"
        f'<text id="natrace-reset" class="button" x="{PAD}" y="38" '
        f'style="display:none">Reset zoom</text>'
        f'<text id="natrace-search-button" class="button" x="{WIDTH - PAD}" y="38" '
        f'text-anchor="end">Search</text>'
        f'<text id="natrace-matched" class="sub" x="{WIDTH - PAD}" y="{height - 8}" '
        f'text-anchor="end"></text>'
        f'<g id="natrace-frames">{"".join(boxes)}</g>{legend}'
        f'<g id="natrace-tip" style="display:none" pointer-events="none">'
        f'<rect rx="3" fill="#fffff0" stroke="#555"/><text x="6" y="15"></text></g>'
        f"<script><![CDATA[{_SCRIPT}]]></script></svg>")
    if embedded:
        return doc
    return '<?xml version="1.0" encoding="UTF-8" standalone="no"?>\n' + doc + "\n"


def _legend(root: _Node, y: int) -> str:
    """The module classes the values are charged to, as the report's module table
    names them (the largest LEGEND_CLASSES, the rest as "others"), each in its
    family's colour."""
    ranked = sorted(root.charged.items(), key=lambda kv: (-kv[1], kv[0]))
    shown = ranked[:LEGEND_CLASSES]
    rest = sum(v for _, v in ranked[LEGEND_CLASSES:])
    items = []
    x = PAD
    for cls, value in shown + ([("others", rest)] if rest else []):
        hue, sat, light = FAMILIES[module_family(cls)]
        pct = 100.0 * value / max(root.value, 1)
        label = f"{cls} {pct:.1f}%"
        items.append(f'<rect x="{x}" y="{y}" width="12" height="12" '
                     f'fill="hsl({hue},{sat}%,{light}%)"/>'
                     f'<text class="legend" x="{x + 16}" y="{y + 10}">{escape(label)}</text>')
        x += 30 + 8 * len(label)
    return f'<g id="natrace-legend">{"".join(items)}</g>'


def render(snap: Snapshot, options: ExportOptions) -> str:
    return render_svg(snap, options)


_CSS = """
text { font: 12px "DejaVu Sans Mono", monospace; fill: #000; }
.title { font-size: 16px; } .sub { fill: #555; } .legend { fill: #333; }
.button { fill: #225; cursor: pointer; text-decoration: underline; }
g.frame { cursor: pointer; } g.frame:hover rect { stroke: #000; stroke-width: 1; }
g.frame.match rect { fill: rgb(230,0,230); }
g.frame.parent { opacity: 0.55; }
"""

_SCRIPT = r"""
(function () {
  var svg = document.getElementById('natrace-flamegraph');
  var frames = Array.prototype.slice.call(svg.querySelectorAll('g.frame'));
  var W = +svg.getAttribute('width'), PAD = +svg.getAttribute('data-pad');
  var total = Math.max(+svg.getAttribute('data-total'), 1);
  var unit = svg.getAttribute('data-unit');
  var inner = W - 2 * PAD;
  var tip = document.getElementById('natrace-tip');
  var tipText = tip.querySelector('text'), tipRect = tip.querySelector('rect');
  var reset = document.getElementById('natrace-reset');
  var matched = document.getElementById('natrace-matched');
  var input = document.getElementById('natrace-search');  // the HTML page's search box

  function num(n) { return Math.round(n).toLocaleString('en-US'); }
  function place(g, x, w) {
    var box = g.querySelector('svg');
    box.setAttribute('x', (PAD + x * inner).toFixed(2));
    box.setAttribute('width', Math.max(w * inner - 0.5, 0).toFixed(2));
  }
  function zoom(g) {
    var zx = +g.dataset.x, zw = +g.dataset.w, zd = +g.dataset.d, eps = 1e-9;
    frames.forEach(function (f) {
      var x = +f.dataset.x, w = +f.dataset.w, d = +f.dataset.d;
      if (d >= zd && x >= zx - eps && x + w <= zx + zw + eps) {
        f.style.display = ''; f.classList.remove('parent'); place(f, (x - zx) / zw, w / zw);
      } else if (d < zd && x <= zx + eps && x + w >= zx + zw - eps) {
        f.style.display = ''; f.classList.add('parent'); place(f, 0, 1);
      } else {
        f.style.display = 'none';
      }
    });
    reset.style.display = zd > 0 ? '' : 'none';
  }
  function search(term) {
    var re = null;
    if (term) { try { re = new RegExp(term); } catch (e) { re = null; } }
    var spans = [];
    frames.forEach(function (f) {
      var hit = re !== null && re.test(f.dataset.n);
      f.classList.toggle('match', hit);
      if (hit) spans.push([+f.dataset.x, +f.dataset.x + +f.dataset.w]);
    });
    spans.sort(function (a, b) { return a[0] - b[0]; });
    var covered = 0, end = -1;  // nested matches are counted once
    spans.forEach(function (s) {
      if (s[0] >= end) { covered += s[1] - s[0]; end = s[1]; }
      else if (s[1] > end) { covered += s[1] - end; end = s[1]; }
    });
    matched.textContent = re ? 'Matched: ' + (100 * covered).toFixed(1) + '% (' +
      num(covered * total) + ' ' + unit + ')' : '';
    if (input && input.value !== (term || '')) input.value = term || '';
  }
  svg.addEventListener('click', function (ev) {
    var g = ev.target.closest ? ev.target.closest('g.frame') : null;
    if (g) zoom(g);
  });
  reset.addEventListener('click', function () { zoom(frames[0]); });
  document.getElementById('natrace-search-button').addEventListener('click', function () {
    var term = window.prompt('Search frames (regular expression)', '');
    if (term !== null) search(term);
  });
  if (input) input.addEventListener('input', function () { search(input.value); });
  svg.addEventListener('mousemove', function (ev) {
    var g = ev.target.closest ? ev.target.closest('g.frame') : null;
    if (!g) { tip.style.display = 'none'; return; }
    var v = +g.dataset.v;
    tipText.textContent = g.dataset.n + ' \u2014 ' + num(v) + ' ' + unit + ' (' +
      (100 * v / total).toFixed(2) + '%)';
    tip.style.display = '';
    var pt = svg.createSVGPoint(); pt.x = ev.clientX; pt.y = ev.clientY;
    var p = pt.matrixTransform(svg.getScreenCTM().inverse());
    var bw = tipText.getComputedTextLength() + 12;
    tipRect.setAttribute('width', bw); tipRect.setAttribute('height', 21);
    var x = Math.min(p.x + 12, W - bw - 2), y = Math.max(p.y - 28, 0);
    tip.setAttribute('transform', 'translate(' + x + ',' + y + ')');
  });
  svg.addEventListener('mouseleave', function () { tip.style.display = 'none'; });
  var m = /[#&]search=([^&]*)/.exec(window.location.hash);
  if (m) search(decodeURIComponent(m[1]));
})();
"""
