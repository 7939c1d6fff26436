#!/usr/bin/env python3
"""Check the relay's ring page (/ring) in a real browser: headless Chromium, standard library only.

    python3 tests/browser/check_ring_page.py --url http://127.0.0.1:6070/ring \\
        --expect-members relay-1,relay-2,relay-3 [--expect-dead relay-3] \\
        [--cluster-json http://127.0.0.1:6070/api/cluster | cluster.json] [--screenshot out.png]

    python3 tests/browser/check_ring_page.py --self-test

What it does:
  1. `chromium --headless=new --disable-gpu --no-sandbox --virtual-time-budget=6000 --dump-dom URL`
     and parses the rendered DOM with html.parser;
  2. asserts that the page rendered /api/cluster at least once (`#status[data-updated]`), that
     every expected member has a row `#members tr[data-member=NAME]` with `data-alive` false for
     the --expect-dead ones and true for the others (and matching the cluster JSON), and that for
     every key of the cluster JSON the keys-table row `#keys tr[data-key=K]` and the ring dot
     `#ring circle.key[data-key=K]` both carry the key's owner in `data-owner`; the arcs
     (`#ring path.arc[data-owner]`) must be drawn for exactly the owners of the ring's tokens;
  3. takes a screenshot: `--screenshot=out.png --window-size=1400,1000`.

The cluster JSON defaults to /api/cluster on the page's origin. As the page and the JSON are read
a moment apart, a mismatch is retried (--attempts, default 3) with a fresh JSON and a fresh page.

Exit status: 0 and a one-line summary when the page is right; 1 with the failed checks when it
is not; 2 when the check cannot run (no Chromium, URL unreachable, bad arguments).

--self-test starts serve_sample.py (this directory) on a free port, runs the checks against it
(3 members, relay-3 dead, 40 keys), makes sure the checks do catch a wrong owner or a wrong alive
flag, and writes tests/browser/ring-sample.png.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

HERE = Path(__file__).resolve().parent
VIRTUAL_TIME_BUDGET_MS = 6000
CHROMIUM_TIMEOUT_S = 90
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param", "source", "track", "wbr"}
TEXT_IDS = {"status", "error", "cluster-id", "node", "view-version"}


class SetupError(Exception):
    """The check could not run (exit 2)."""


# ---------- browser ----------

def find_chromium(explicit: str | None) -> str:
    candidates = [explicit] if explicit else [os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome",
                                               "google-chrome-stable"]
    for c in candidates:
        if not c:
            continue
        path = shutil.which(c) or (c if os.path.isfile(c) and os.access(c, os.X_OK) else None)
        if path:
            return path
    raise SetupError("no Chromium found (tried chromium, chromium-browser, google-chrome; set --chromium or $CHROMIUM); "
                     "install it with: apt-get update && apt-get install -y chromium")


def run_chromium(binary: str, url: str, extra: list[str], budget_ms: int) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="ring-check-chromium-") as profile:
        cmd = [binary, "--headless=new", "--disable-gpu", "--no-sandbox", f"--virtual-time-budget={budget_ms}",
               f"--user-data-dir={profile}", "--no-first-run", "--no-default-browser-check", "--disable-extensions",
               "--disable-dev-shm-usage", "--hide-scrollbars", *extra, url]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=CHROMIUM_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise SetupError(f"chromium did not finish within {CHROMIUM_TIMEOUT_S}s: {' '.join(cmd)}") from None
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-8:])
        raise SetupError(f"chromium exited with {proc.returncode}: {' '.join(cmd)}\n{tail}")
    return proc


def dump_dom(binary: str, url: str, budget_ms: int) -> str:
    out = run_chromium(binary, url, ["--dump-dom"], budget_ms).stdout
    if "<html" not in out.lower():
        raise SetupError(f"chromium --dump-dom returned no page for {url} (is the relay's admin server up?)")
    return out


def screenshot(binary: str, url: str, path: Path, budget_ms: int) -> None:
    path = path.resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    run_chromium(binary, url, [f"--screenshot={path}", "--window-size=1400,1000"], budget_ms)
    if not path.exists() or path.read_bytes()[:8] != b"\x89PNG\r\n\x1a\n":
        raise SetupError(f"chromium wrote no PNG screenshot to {path}")


# ---------- DOM ----------

@dataclass
class Element:
    tag: str
    attrs: dict[str, str]
    within: frozenset[str]  # ids of the element and its ancestors

    @property
    def classes(self) -> set[str]:
        return set(self.attrs.get("class", "").split())


@dataclass
class Dom:
    elements: list[Element] = field(default_factory=list)
    texts: dict[str, str] = field(default_factory=dict)

    def find(self, tag: str, within: str, attr: str, cls: str | None = None) -> list[Element]:
        return [e for e in self.elements
                if e.tag == tag and within in e.within and attr in e.attrs and (cls is None or cls in e.classes)]

    def by_id(self, ident: str) -> Element | None:
        return next((e for e in self.elements if e.attrs.get("id") == ident), None)


class DomParser(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.dom = Dom()
        self.stack: list[tuple[str, frozenset[str], str | None]] = []

    def handle_starttag(self, tag, attrs):
        a = {k: (v if v is not None else "") for k, v in attrs}
        parent = self.stack[-1][1] if self.stack else frozenset()
        ident = a.get("id")
        within = parent | {ident} if ident else parent
        self.dom.elements.append(Element(tag, a, within))
        if tag not in VOID:
            self.stack.append((tag, within, ident))

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in VOID and self.stack and self.stack[-1][0] == tag:
            self.stack.pop()

    def handle_endtag(self, tag):
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i][0] == tag:
                del self.stack[i:]
                return

    def handle_data(self, data):
        for _, _, ident in self.stack:
            if ident in TEXT_IDS:
                self.dom.texts[ident] = self.dom.texts.get(ident, "") + data


def parse_dom(html: str) -> Dom:
    p = DomParser()
    p.feed(html)
    p.close()
    p.dom.texts = {k: " ".join(v.split()) for k, v in p.dom.texts.items()}
    return p.dom


# ---------- cluster JSON ----------

def load_cluster(source: str) -> dict:
    try:
        if source.startswith(("http://", "https://")):
            req = urllib.request.Request(source, headers={"Accept": "application/json", "Cache-Control": "no-store"})
            with urllib.request.urlopen(req, timeout=10) as res:
                body = res.read()
        else:
            body = Path(source).read_bytes()
    except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace").strip()[:200]
        raise SetupError(f"cannot read cluster JSON {source}: HTTP {e.code} {detail}") from None
    except (OSError, urllib.error.URLError) as e:
        raise SetupError(f"cannot read cluster JSON {source}: {e}") from None
    try:
        data = json.loads(body)
    except json.JSONDecodeError as e:
        raise SetupError(f"cluster JSON {source} is not JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("keys", []), list):
        raise SetupError(f"cluster JSON {source} does not look like /api/cluster (no 'keys' list)")
    return data


def ring_owner(tokens: list[dict], position: float) -> str | None:
    """The owner per the page's reading of the tokens: the first token at or after the position."""
    if not tokens:
        return None
    for t in tokens:
        if float(t["position"]) >= position:
            return t.get("owner")
    return tokens[0].get("owner")


# ---------- checks ----------

@dataclass
class Result:
    errors: list[str]
    warnings: list[str]
    summary: str


def check(dom: Dom, cluster: dict | None, expect_members: list[str], expect_dead: list[str]) -> Result:
    errors: list[str] = []
    warnings: list[str] = []

    status = dom.by_id("status")
    if status is None:
        errors.append("no #status element: is this the ring page?")
    else:
        updated = status.attrs.get("data-updated", "")
        if not updated.isdigit() or int(updated) <= 0:
            banner = dom.texts.get("error", "")
            errors.append("the page never rendered /api/cluster (#status has no data-updated; status "
                          f"{dom.texts.get('status', '')!r}" + (f", error banner {banner!r}" if banner else "") + ")")
            return Result(errors, warnings, "")

    # members
    rows = {e.attrs["data-member"]: e for e in dom.find("tr", "members", "data-member")}
    expected = list(dict.fromkeys(expect_members + expect_dead))
    for name in expected:
        row = rows.get(name)
        want = "false" if name in expect_dead else "true"
        if row is None:
            errors.append(f"member {name}: no row #members tr[data-member={name!r}] (rows: {', '.join(rows) or 'none'})")
        elif row.attrs.get("data-alive") != want:
            errors.append(f"member {name}: data-alive={row.attrs.get('data-alive')!r}, expected {want!r}")
        elif not row.attrs.get("data-state"):
            errors.append(f"member {name}: row has no data-state")
    for name in rows:
        if expected and name not in expected:
            warnings.append(f"member {name} is on the page but was not expected")

    key_rows: dict[str, Element] = {}
    for e in dom.find("tr", "keys", "data-key"):
        key_rows.setdefault(e.attrs["data-key"], e)
    dots: dict[str, Element] = {}
    for e in dom.find("circle", "ring", "data-key", cls="key"):
        dots.setdefault(e.attrs["data-key"], e)
    arcs = dom.find("path", "ring", "data-owner", cls="arc")
    arc_owners = {e.attrs["data-owner"] for e in arcs}

    n_keys = len(key_rows)
    if cluster is not None:
        page_id = dom.texts.get("cluster-id")
        if cluster.get("cluster_id") is not None and page_id is not None and page_id != str(cluster["cluster_id"]):
            errors.append(f"header cluster id {page_id!r}, /api/cluster says {cluster['cluster_id']!r}")
        for m in cluster.get("members", []):
            name, alive = m.get("name"), m.get("alive", True) is not False
            row = rows.get(name)
            if row is None:
                if name not in expected:
                    errors.append(f"member {name} (in the cluster JSON): no row on the page")
            elif row.attrs.get("data-alive") != ("true" if alive else "false"):
                errors.append(f"member {name}: page data-alive={row.attrs.get('data-alive')!r}, cluster JSON alive={alive}")
        keys = cluster.get("keys", [])
        tokens = sorted(cluster.get("ring", {}).get("tokens", []), key=lambda t: float(t["position"]))
        json_keys = set()
        for k in keys:
            key = k.get("key")
            json_keys.add(key)
            owner = k.get("owner") or ""
            row, dot = key_rows.get(key), dots.get(key)
            if row is None:
                errors.append(f"key {key}: no row #keys tr[data-key={key!r}]")
            elif row.attrs.get("data-owner", "") != owner:
                errors.append(f"key {key}: table row owner {row.attrs.get('data-owner')!r}, /api/cluster owner {owner!r}")
            if dot is None:
                errors.append(f"key {key}: no dot #ring circle.key[data-key={key!r}]")
            elif dot.attrs.get("data-owner", "") != owner:
                errors.append(f"key {key}: ring dot owner {dot.attrs.get('data-owner')!r}, /api/cluster owner {owner!r}")
            if tokens and "position" in k:
                by_ring = ring_owner(tokens, float(k["position"])) or ""
                if by_ring != owner:
                    warnings.append(f"key {key}: at position {k['position']} the drawn arc belongs to {by_ring!r} "
                                    f"but /api/cluster says owner {owner!r}")
        extra = sorted(set(key_rows) - json_keys)
        if extra:
            errors.append(f"{len(extra)} key(s) on the page are not in /api/cluster: {', '.join(extra[:5])}")
        token_owners = {t.get("owner") or "" for t in tokens}
        if token_owners != arc_owners:
            errors.append(f"ring arcs drawn for {sorted(arc_owners)}, but the ring's tokens are owned by {sorted(token_owners)}")
        n_keys = len(keys)
    elif not key_rows:
        warnings.append("no keys on the page (and no cluster JSON to compare with)")

    dead = [n for n, r in rows.items() if r.attrs.get("data-alive") == "false"]
    summary = (f"{len(rows)} members ({len(dead)} dead{': ' + ', '.join(dead) if dead else ''}), "
               f"{n_keys} keys with matching owners in table and ring, "
               f"{len(arcs)} arcs over {len(arc_owners)} owners")
    return Result(errors, warnings, summary)


# ---------- driver ----------

def default_cluster_url(page_url: str) -> str:
    return urllib.parse.urljoin(page_url, "/api/cluster")


def run_checks(args) -> int:
    binary = find_chromium(args.chromium)
    expect_members = [m.strip() for m in (args.expect_members or "").split(",") if m.strip()]
    expect_dead = [m.strip() for m in (args.expect_dead or "").split(",") if m.strip()]
    source = args.cluster_json or default_cluster_url(args.url)
    cluster_from_file = not source.startswith(("http://", "https://"))
    cluster = load_cluster(source) if cluster_from_file else None

    result = None
    for attempt in range(1, max(1, args.attempts) + 1):
        if not cluster_from_file:
            cluster = load_cluster(source)
        dom = parse_dom(dump_dom(binary, args.url, args.budget))
        result = check(dom, cluster, expect_members, expect_dead)
        if not result.errors:
            break
        if attempt < args.attempts:
            print(f"attempt {attempt}: {len(result.errors)} check(s) failed, retrying", file=sys.stderr)
            time.sleep(1)

    for w in result.warnings[:20]:
        print(f"warning: {w}", file=sys.stderr)
    if result.errors:
        print(f"FAIL: ring page {args.url}: {len(result.errors)} check(s) failed:", file=sys.stderr)
        for e in result.errors[:30]:
            print(f"  - {e}", file=sys.stderr)
        if len(result.errors) > 30:
            print(f"  ... and {len(result.errors) - 30} more", file=sys.stderr)
        return 1

    shot = ""
    if args.screenshot:
        screenshot(binary, args.url, Path(args.screenshot), args.budget)
        shot = f"; screenshot {args.screenshot}"
    print(f"OK: ring page {args.url}: {result.summary}{shot}")
    return 0


def self_test(args) -> int:
    server = subprocess.Popen([sys.executable, str(HERE / "serve_sample.py"), "--port", "0", "--quiet"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([server.stdout], [], [], 15)
        line = server.stdout.readline().strip() if ready else ""
        if not line.startswith("serving "):
            server.kill()
            raise SetupError(f"serve_sample.py did not start: {line!r} {server.stderr.read()[-500:]}")
        url = line.split(" ", 1)[1]
        args.url = url
        args.cluster_json = default_cluster_url(url)
        args.expect_members = "relay-1,relay-2,relay-3"
        args.expect_dead = "relay-3"
        args.screenshot = str(HERE / "ring-sample.png")

        # The checks must catch a wrong page: a key with another owner, a wrong alive flag.
        binary = find_chromium(args.chromium)
        cluster = load_cluster(args.cluster_json)
        dom = parse_dom(dump_dom(binary, url, args.budget))
        good = check(dom, cluster, ["relay-1", "relay-2", "relay-3"], ["relay-3"])
        if good.errors:
            print("FAIL: self-test: the sample page does not pass:\n  - " + "\n  - ".join(good.errors[:20]), file=sys.stderr)
            return 1
        tampered = json.loads(json.dumps(cluster))
        owners = sorted({t["owner"] for t in tampered["ring"]["tokens"]})
        k = tampered["keys"][0]
        k["owner"] = next(o for o in owners if o != k["owner"])
        bad_owner = check(dom, tampered, [], [])
        bad_alive = check(dom, None, ["relay-1", "relay-2", "relay-3"], ["relay-2"])
        missing = check(dom, None, ["relay-1", "relay-7"], [])
        for name, res in (("a wrong owner", bad_owner), ("a wrong alive flag", bad_alive), ("a missing member", missing)):
            if not res.errors:
                print(f"FAIL: self-test: the checks did not catch {name}", file=sys.stderr)
                return 1
        return run_checks(args)
    finally:
        if server.poll() is None:
            server.terminate()
            try:
                server.wait(5)
            except subprocess.TimeoutExpired:
                server.kill()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Check the xds-relay ring page in headless Chromium.",
                                 epilog="See the module docstring for details.")
    ap.add_argument("--url", help="the ring page, e.g. http://127.0.0.1:6070/ring")
    ap.add_argument("--expect-members", help="comma-separated member names that must have a row")
    ap.add_argument("--expect-dead", help="comma-separated members that must be shown dead (the others alive)")
    ap.add_argument("--cluster-json", help="path or URL of /api/cluster to cross-check owners (default: /api/cluster on --url's origin)")
    ap.add_argument("--screenshot", help="write a 1400x1000 PNG of the page here after the checks pass")
    ap.add_argument("--chromium", help="the Chromium binary (default: chromium or chromium-browser on PATH)")
    ap.add_argument("--attempts", type=int, default=3, help="tries before reporting a mismatch (default 3)")
    ap.add_argument("--budget", type=int, default=VIRTUAL_TIME_BUDGET_MS, help="chromium --virtual-time-budget in ms")
    ap.add_argument("--self-test", action="store_true", help="check the page against serve_sample.py; writes ring-sample.png")
    args = ap.parse_args(argv)
    try:
        if args.self_test:
            return self_test(args)
        if not args.url:
            ap.error("--url is required (or --self-test)")
        return run_checks(args)
    except SetupError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
