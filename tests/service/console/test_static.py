"""The console's files as the API serves them: a strict Content-Security-Policy, nothing inline,
nothing from another origin, and only the files of ``app/console/static``."""

from __future__ import annotations

import re

import httpx

from app.console.router import STATIC
from tests.service.conftest import Service

FILES = sorted(p.name for p in STATIC.iterdir() if p.is_file())


def test_every_file_is_served_with_a_strict_policy(service: Service) -> None:
    assert {"index.html", "app.js", "api.js", "console.css"} <= set(FILES)
    with httpx.Client(base_url=service.url, timeout=30) as anonymous:  # the files hold no data: no key
        r = anonymous.get("/console")
        assert r.status_code == 308 and r.headers["location"] == "/console/"
        for name in ["", *FILES]:
            r = anonymous.get(f"/console/{name}")
            assert r.status_code == 200, (name, r.text)
            csp = r.headers["content-security-policy"]
            directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
            assert directives["default-src"] == "'self'"
            assert directives["script-src"] == "'self'" and directives["style-src"] == "'self'"
            assert directives["frame-ancestors"] == "'none'" and directives["object-src"] == "'none'"
            assert "unsafe" not in csp
            assert r.headers["x-content-type-options"] == "nosniff"
            expected = {"": "text/html", ".html": "text/html", ".js": "text/javascript", ".css": "text/css"}
            suffix = "" if not name else name[name.rfind(".") :]
            if suffix in expected:
                assert r.headers["content-type"].startswith(expected[suffix]), name

        for bad in ("nope.js", "..%2Frouter.py", "%2e%2e/router.py", "static", "__init__.py"):
            r = anonymous.get(f"/console/{bad}")
            assert r.status_code == 404, (bad, r.status_code)
        assert anonymous.get("/console/..%2F..%2Fmain.py").status_code == 404


def test_the_files_hold_nothing_inline_and_nothing_from_elsewhere() -> None:
    html = (STATIC / "index.html").read_text()
    scripts = re.findall(r"<script\b[^>]*>", html)
    assert scripts and all("src=" in tag for tag in scripts)  # no inline script
    assert not re.search(r"<style\b|\sstyle=|\son[a-z]+=", html)  # no inline style or handler
    for path in STATIC.iterdir():
        text = path.read_text()
        urls = set(re.findall(r"https?://[^\s\"')]+", text))
        assert urls <= {"http://www.w3.org/2000/svg"}, (path.name, urls)  # the SVG namespace only
        if path.suffix == ".js":
            # Text from the API goes in as text: no HTML parsing of strings, no code from strings.
            for banned in (
                "innerHTML",
                "outerHTML",
                "insertAdjacentHTML",
                "document.write",
                "eval(",
                "Function(",
            ):
                assert banned not in text, (path.name, banned)


def test_the_console_is_not_in_the_api_document_but_its_two_api_routes_are(service: Service) -> None:
    doc = service.client.get("/openapi.json").json()
    assert not any(path.startswith("/console") for path in doc["paths"])
    assert set(doc["paths"]["/v1/datasets/{dataset_id}/images"]) >= {"get", "post"}
    thumb = doc["paths"]["/v1/datasets/{dataset_id}/images/{image_id}/thumbnail"]["get"]
    assert "image/jpeg" in thumb["responses"]["200"]["content"]
    assert {p["name"] for p in thumb["parameters"]} >= {"dataset_id", "image_id", "size"}
