// A small, safe markdown renderer for model output.
//
// It builds DOM nodes: every piece of model text reaches the page through createTextNode or
// textContent, never through innerHTML, so `<script>` or `<img onerror=...>` in a reply is
// shown as text. Links are made only for http(s) URLs. Covered: fenced code blocks (an
// unclosed fence, as while streaming, runs to the end), inline code, bold, italic, headings,
// lists, block quotes, rules and paragraphs.
"use strict";

(function (root) {
  const FENCE = /^\s{0,3}(`{3,}|~{3,})\s*([\w+#.-]*)[^`]*$/;
  const HEADING = /^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
  const ITEM = /^\s{0,3}([-*+]|\d{1,9}[.)])\s+(.*)$/;
  const QUOTE = /^\s{0,3}>\s?(.*)$/;
  const RULE = /^\s{0,3}([-*_])(\s*\1){2,}\s*$/;
  const INLINE = "(`+)([^`]|[^`][\\s\\S]*?[^`])\\1(?!`)" +       // 1, 2: code span
    "|\\*\\*(?=\\S)([\\s\\S]*?\\S)\\*\\*|__(?=\\S)([\\s\\S]*?\\S)__" + // 3, 4: bold
    "|\\*(?=[^\\s*])([^*]*?[^\\s*])\\*|\\b_(?=[^\\s_])([^_]*?[^\\s_])_\\b" + // 5, 6: italic
    "|\\[([^\\]\\n]+)\\]\\((https?:\\/\\/[^\\s()]+)\\)";             // 7, 8: link

  function add(parent, tag, text) {
    const node = document.createElement(tag);
    if (text !== undefined) node.textContent = text;
    parent.appendChild(node);
    return node;
  }

  function inline(parent, text) {
    const re = new RegExp(INLINE, "g");
    let last = 0;
    let m;
    while ((m = re.exec(text)) !== null) {
      if (m.index > last) parent.appendChild(document.createTextNode(text.slice(last, m.index)));
      if (m[1] !== undefined) {
        add(parent, "code", m[2]);
      } else if (m[3] !== undefined || m[4] !== undefined) {
        inline(add(parent, "strong"), m[3] !== undefined ? m[3] : m[4]);
      } else if (m[5] !== undefined || m[6] !== undefined) {
        inline(add(parent, "em"), m[5] !== undefined ? m[5] : m[6]);
      } else {
        const a = add(parent, "a", m[7]);
        a.href = m[8];  // matched ^https?:// above: no javascript: or data: URL
        a.rel = "noopener noreferrer nofollow";
        a.target = "_blank";
      }
      last = re.lastIndex;
    }
    if (last < text.length) parent.appendChild(document.createTextNode(text.slice(last)));
  }

  function lines(parent, texts) {  // lines of one paragraph: soft breaks kept as <br>
    texts.forEach((t, i) => {
      if (i) add(parent, "br");
      inline(parent, t);
    });
  }

  function codeBlock(parent, body, lang) {
    const pre = add(parent, "pre");
    const code = add(pre, "code", body.join("\n"));
    if (lang) {
      code.className = "language-" + lang.replace(/[^\w+#.-]/g, "");
      pre.dataset.lang = lang;
    }
    const copy = add(pre, "button", "copy");
    copy.type = "button";
    copy.className = "copy";
    copy.addEventListener("click", () => {
      if (navigator.clipboard) navigator.clipboard.writeText(code.textContent).catch(() => {});
    });
  }

  // Render `text` as markdown into a fresh <div class="md">; returns the div.
  function render(text) {
    const out = document.createElement("div");
    out.className = "md";
    const src = String(text).replace(/\r\n?/g, "\n").split("\n");
    let i = 0;
    let para = [];
    const flush = () => {
      if (para.length) lines(add(out, "p"), para);
      para = [];
    };
    while (i < src.length) {
      const line = src[i];
      let m;
      if ((m = FENCE.exec(line))) {
        flush();
        const fence = m[1];
        const body = [];
        i++;
        while (i < src.length && !src[i].trim().startsWith(fence)) body.push(src[i++]);
        i++;  // the closing fence (or past the end while it is still streaming)
        codeBlock(out, body, m[2]);
        continue;
      }
      if (!line.trim()) {
        flush();
      } else if (RULE.test(line)) {
        flush();
        add(out, "hr");
      } else if ((m = HEADING.exec(line))) {
        flush();
        inline(add(out, "h" + Math.min(6, m[1].length + 2)), m[2]);
      } else if ((m = ITEM.exec(line))) {
        flush();
        const ordered = /\d/.test(m[1]);
        const list = add(out, ordered ? "ol" : "ul");
        if (ordered && parseInt(m[1], 10) !== 1) list.start = parseInt(m[1], 10);
        while (i < src.length && (m = ITEM.exec(src[i])) && /\d/.test(m[1]) === ordered) {
          inline(add(list, "li"), m[2]);
          i++;
        }
        continue;
      } else if (QUOTE.test(line)) {
        flush();
        const quoted = [];
        while (i < src.length && (m = QUOTE.exec(src[i]))) {
          quoted.push(m[1]);
          i++;
        }
        add(out, "blockquote").appendChild(render(quoted.join("\n")));
        continue;
      } else {
        para.push(line);
      }
      i++;
    }
    flush();
    return out;
  }

  root.renderMarkdown = render;
})(window);
