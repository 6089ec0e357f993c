"""Screenshots of the MLflow UI as a researcher opens it, for docs/mlflow.md: the experiment page, a
run page, three runs compared, and the chart view. Serves a store with `mlflow server` on loopback
and photographs each page with headless Chromium (Debian's `chromium` package).

    .venv/bin/python docs/screenshots.py [--store sqlite:///mlflow.db] [--out docs]

The store needs finished training runs (a sweep: docs/results.md).

    .venv/bin/python docs/screenshots.py --report results/report [--out docs]

opens the report's index.html instead, checks in Chromium that every image on it loaded (exit 1
if one did not) and photographs it as report_index.png.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

from mlflow.tracking import MlflowClient

PAGES = ("experiment", "run", "compare", "charts")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(store: str, port: int) -> subprocess.Popen:
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            store,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(120):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return server
        except OSError:
            time.sleep(0.5)
    server.kill()
    raise SystemExit("mlflow server did not start within 60 s")


def urls(client: MlflowClient, base: str, experiment: str) -> dict[str, str]:
    """Each page's address: the experiment's runs, its widest run, three runs of different widths
    compared, the chart view."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"no experiment {experiment!r} in the store")
    runs = sorted(
        (
            r
            for r in client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'")
            if "width" in r.data.params
        ),
        key=lambda r: int(r.data.params["width"]),
    )
    if len(runs) < 3:
        raise SystemExit(
            f"experiment {experiment!r} has {len(runs)} finished training runs; the compare page "
            "needs 3"
        )
    chosen = [runs[0], runs[len(runs) // 2], runs[-1]]
    ids = urllib.parse.quote(json.dumps([r.info.run_id for r in chosen]))
    home = f"{base}/#/experiments/{exp.experiment_id}"
    # MLflow 3 opens every experiment on its GenAI view unless the browser chose "Model training"
    # once (kept in its local storage); a fresh profile has not, and the URL says it instead.
    training = "workflowType=machine_learning"
    experiments = urllib.parse.quote(json.dumps([exp.experiment_id]))
    return {
        "experiment": f"{home}/runs?{training}",
        "run": f"{home}/runs/{runs[-1].info.run_id}?{training}",
        "compare": f"{base}/#/compare-runs?runs={ids}&experiments={experiments}&{training}",
        "charts": f"{home}/runs?{training}&compareRunsMode=CHART",
    }


def photograph(url: str, path: Path, browser: str, window: str = "1600,1000") -> None:
    with tempfile.TemporaryDirectory() as profile:  # a fresh profile: no columns chosen before
        subprocess.run(
            [
                browser,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                f"--user-data-dir={profile}",
                f"--window-size={window}",
                "--virtual-time-budget=20000",
                f"--screenshot={path}",
                url,
            ],
            check=True,
            capture_output=True,
            timeout=180,
        )
    if not path.exists():
        raise SystemExit(f"chromium wrote no screenshot of {url}")


# Appended to a copy of the page beside it: once the page has loaded, the body records how many
# of its images decoded, which --dump-dom then prints.
COUNT_IMAGES = """<script>addEventListener("load", () => {
  const all = [...document.images], ok = all.filter(i => i.complete && i.naturalWidth > 0);
  document.body.dataset.loaded = ok.length + "/" + all.length;
});</script>"""


def check_report(folder: Path, out: Path, browser: str) -> Path:
    """Open folder/index.html in headless Chromium: every image must load; then photograph it."""
    index = folder / "index.html"
    if not index.exists():
        raise SystemExit(f"no {index}: run `lipdd report` first")
    probe = folder / ".loaded-check.html"
    probe.write_text(index.read_text().replace("</body>", COUNT_IMAGES + "</body>"))
    try:
        with tempfile.TemporaryDirectory() as profile:
            dom = subprocess.run(
                [browser, "--headless", "--no-sandbox", "--disable-gpu",
                 f"--user-data-dir={profile}", "--virtual-time-budget=10000", "--dump-dom",
                 probe.resolve().as_uri()],
                check=True, capture_output=True, text=True, timeout=180,
            ).stdout  # fmt: skip
    finally:
        probe.unlink()
    loaded = re.search(r'data-loaded="(\d+)/(\d+)"', dom)
    if loaded is None or loaded[1] != loaded[2] or loaded[2] == "0":
        raise SystemExit(f"{index}: images loaded in Chromium: {loaded and loaded[0]}")
    print(f"{index}: {loaded[1]} of {loaded[2]} images loaded")
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report_index.png"
    photograph(index.resolve().as_uri(), path, browser, "1300,2600")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", default="sqlite:///mlflow.db", help="tracking store to serve")
    parser.add_argument("--experiment", default="lipdd")
    parser.add_argument("--out", default=str(Path(__file__).parent), help="folder of the PNGs")
    parser.add_argument("--report", type=Path, help="a report folder: check its index.html")
    args = parser.parse_args()
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("needs Chromium: apt-get install chromium")
    if args.report:
        print(check_report(args.report, Path(args.out), browser))
        return
    port = free_port()
    server = serve(args.store, port)
    try:
        pages = urls(MlflowClient(args.store), f"http://127.0.0.1:{port}", args.experiment)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        for name in PAGES:
            path = Path(args.out) / f"mlflow_{name}.png"
            photograph(pages[name], path, browser)
            print(path)
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
