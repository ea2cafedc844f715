"""Screenshot a report.html in headless Chromium, to check how the report looks.

    python benchmarks/screenshot_report.py runs/bench/report.html report.png [--width 1280 --height 2000]

Chromium runs with a throw-away profile and every network feature off: the report is
self-contained, so nothing should be fetched.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


def screenshot(html: str | Path, png: str | Path, width: int = 1280, height: int = 2000,
               timeout_s: float = 120) -> Path:
    """Render `html` to `png` at width x height pixels; return the PNG path."""
    chromium = find_chromium()
    if chromium is None:
        raise RuntimeError("No Chromium found. On Debian: apt-get install -y chromium")
    html, png = Path(html).resolve(), Path(png).resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--hide-scrollbars", f"--user-data-dir={profile}", f"--screenshot={png}",
               f"--window-size={width},{height}", html.as_uri()]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0 or not png.is_file():
        raise RuntimeError(f"Chromium failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return png


def png_size(path: str | Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    head = Path(path).read_bytes()[:24]
    if head[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path} is not a PNG")
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("html", help="report.html to render")
    parser.add_argument("png", help="where to write the screenshot")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=2000)
    args = parser.parse_args(argv)
    out = screenshot(args.html, args.png, args.width, args.height)
    w, h = png_size(out)
    print(f"wrote {out} ({w}x{h}, {out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
