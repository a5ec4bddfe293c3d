"""Screenshots of a study report's sections for docs/ (headless chromium): one PNG per section named on the command
line, cut at the report's <h2 id="..."> anchors.

    .venv/bin/python scripts/report_screenshots.py artifacts/runs/quickstart/report.html docs/quickstart-report \
        findings-what-differs-between-the-models= behaviour-under-nudges=-behaviour \
        honesty-under-pressure-and-capability=-honesty \
        directions-and-probes-held-out-metrics-folds-split-by-prompt=-directions \
        token-by-token-the-misalignment-direction-on-insecure-s-answers=-tokens \
        steering-quickstart-misalignment-dose-response-beside-the-random-control=-steering-misalignment \
        steering-quickstart-refusal-dose-response-beside-the-random-control=-steering-refusal
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path


def sections(html: str) -> tuple[str, dict[str, str]]:
    head, body = html.split("<h1>", 1)
    parts = re.split(r'(?=<h2 id=")', body)
    found = {re.match(r'<h2 id="([^"]+)"', p).group(1): p for p in parts[1:]}
    return head, found


def main() -> None:
    report, prefix, wanted = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    head, found = sections(report.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        for item in wanted:
            anchor, suffix = item.split("=", 1)
            page = Path(tmp) / f"{anchor}.html"
            page.write_text(head + found[anchor].removesuffix("</body></html>") + "</body></html>")
            out = Path(f"{prefix}{suffix}.png").resolve()
            subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                            "--window-size=1100,1400", f"--screenshot={out}", page.as_uri()], check=True,
                           capture_output=True)
            print(out)


if __name__ == "__main__":
    main()
