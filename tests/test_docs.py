"""The documentation agrees with the code: the README's settings table names every flag, the
metrics table names every `endpoint` label, and every relative link in README.md and docs/*.md
reaches an existing file and heading."""
from __future__ import annotations

import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from wsgateway.config import FLAGS

PROJECT = Path(__file__).resolve().parent.parent
PAGES = [PROJECT / "README.md", *sorted((PROJECT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def heading_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, punctuation dropped, spaces as dashes."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)  # no headings inside code
    return {heading_anchor(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}


def test_readme_settings_table_names_every_flag():
    """Each flag in wsgateway/config.py has its row in the README's Configuration table."""
    readme = (PROJECT / "README.md").read_text()
    table = readme.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `-([a-z0-9-]+)` \|", table, re.MULTILINE))
    assert documented == {flag.name for flag in FLAGS}


def test_every_relative_link_reaches_a_file_and_heading():
    """Links between README.md and docs/*.md (and to files in the project) point at what exists."""
    broken = []
    for page in PAGES:
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue  # an external address
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken
    assert {page.name for page in PAGES} >= {"README.md", "operations.md", "scale-out.md",
                                             "reliability.md", "performance.md", "architecture.md"}


def test_documented_endpoint_labels_are_the_apps_endpoints(start_gateway):
    """docs/operations.md lists exactly the `endpoint` values of ws_http_requests_total a gateway (with every
    route, -console included) can count: Flask's endpoints, the publishing routes, and `unmatched`."""
    gateway = start_gateway("-console")
    flask_endpoints = {rule.endpoint for rule in gateway.gateway.server.application.built().url_map.iter_rules()}
    exported = text_string_to_metric_families(gateway.get("/metrics").body.decode())
    publishing = {sample.labels["endpoint"] for family in exported for sample in family.samples
                  if sample.name == "ws_publish_duration_seconds_count"}
    assert publishing == {"publish", "publish_batch", "broadcast"}
    row = next(line for line in (PROJECT / "docs" / "operations.md").read_text().splitlines()
               if line.startswith("| `ws_http_requests_total{endpoint,status}` |"))
    documented = set(re.findall(r"`([a-z_.]+)`", row.split("|")[2]))
    assert documented == flask_endpoints | publishing | {"unmatched"}
