"""How a build's and an evaluation's time and memory grow with the data (a benchmark, not a test).

`python -m model_export scaling --scales 1x1 10x10`: for each scale UxI, the synthetic stream
with U times ml-100k's users (943) and I times its items (1,682), 106 events per user as
ml-100k has, is written as a generic CSV log and catalog; then `build` and `evaluate` run on
it as a user would run them, each in a process of its own whose peak RSS the kernel reports
(`os.wait4`). Builds use `--quick`'s epochs unless `--full` (or `--epochs N` for the GPT):
memory does not depend on the number of epochs, time does.
"""
from __future__ import annotations

import csv
import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

from . import data

ML100K_USERS, ML100K_ITEMS, EVENTS_PER_USER = 943, 1682, 106


def parse_scale(text: str) -> tuple[int, int]:
    users, _, items = text.partition("x")
    if not (users.isdigit() and items.isdigit()):
        raise data.DataError(f"scale {text!r}: write USERSxITEMS multiples of ml-100k, e.g. 10x10")
    return int(users), int(items)


def write_log(folder: Path, users: int, items: int, seed: int = 0) -> int:
    """The synthetic stream as log.csv + items.csv in `folder`; returns its interactions."""
    ds = data.synthetic(n_users=users, n_items=items, n_topics=8, events_per_user=EVENTS_PER_USER,
                        seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "log.csv", "w", newline="") as handle:
        out = csv.writer(handle)
        out.writerow(["user_id", "item_id", "timestamp", "event_type"])
        out.writerows((it.user_id, it.item_id, it.ts, it.event_type) for it in ds.interactions)
    with open(folder / "items.csv", "w", newline="") as handle:
        out = csv.writer(handle)
        out.writerow(["item_id", "title", "text"])
        out.writerows((i, v["title"], v["text"]) for i, v in ds.items.items())
    return len(ds.interactions)


def write_log_apart(folder: Path, users: int, items: int) -> int:
    """`write_log` in a process of its own, so that this one stays small (see `measured`)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(write_log, (folder, users, items))


def measured(cmd: list[str], log_path: Path) -> dict:
    """Run `cmd`; its wall time and peak RSS as the kernel reports it. Linux counts in a
    child's peak the peak of the process that started it (the memory shared until exec),
    so the caller must be small: this module keeps big data out of its own process."""
    started = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise data.DataError(f"{' '.join(cmd)} exited with {code}; see {log_path}")
    return {"seconds": round(time.monotonic() - started, 1),
            "peak_rss_mib": round(usage.ru_maxrss / 1024)}  # ru_maxrss: KiB on Linux


def run_scale(scale: str, root: Path, full: bool, epochs: int | None = None) -> dict:
    u, i = parse_scale(scale)
    folder = root / f"scale-{scale}"
    users, items = ML100K_USERS * u, ML100K_ITEMS * i
    interactions = write_log_apart(folder, users, items)
    given = ["--data", str(folder / "log.csv"), "--catalog", str(folder / "items.csv")]
    py = [sys.executable, "-m", "model_export"]
    build = measured([*py, "build", *given, "--out", str(folder / "bundle"),
                      *([] if full else ["--quick"]),
                      *([] if epochs is None else ["--epochs", str(epochs)])], folder / "build.log")
    evaluate = measured([*py, "evaluate", "--bundle", str(folder / "bundle"), *given,
                         "--json", str(folder / "evaluate.json")], folder / "evaluate.log")
    return {"scale": scale, "users": users, "items": items, "interactions": interactions,
            "epochs": epochs or ("full" if full else "quick"), "build": build, "evaluate": evaluate}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["interactions"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, unit in ((axes[0], "peak_rss_mib", "peak RSS (MiB)"), (axes[1], "seconds", "seconds")):
        for step in ("build", "evaluate"):
            ys = [r[step][key] for r in rows]
            ax.plot(x, ys, "o-", label=step)
            for r, xi, yi in zip(rows, x, ys):
                ax.annotate(r.get("label", r["scale"]), (xi, yi), textcoords="offset points",
                            xytext=(4, 4), fontsize=8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("interactions")
        ax.set_ylabel(unit)
        ax.legend()
    fig.suptitle("synthetic stream at multiples of ml-100k's users x items (labels: UxI)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def print_table(rows: list[dict]) -> None:
    print(f"{'scale':<8}{'users':>8}{'items':>8}{'interactions':>14}{'build s':>9}{'build MiB':>10}"
          f"{'eval s':>8}{'eval MiB':>9}")
    for r in rows:
        print(f"{r['scale']:<8}{r['users']:>8}{r['items']:>8}{r['interactions']:>14}"
              f"{r['build']['seconds']:>9.0f}{r['build']['peak_rss_mib']:>10}"
              f"{r['evaluate']['seconds']:>8.0f}{r['evaluate']['peak_rss_mib']:>9}")


def scaling(scales: list[str], root: Path, json_path: Path, plot_path: Path | None,
            full: bool, epochs: int | None = None) -> list[dict]:
    """Runs `scales`; the rows of other scales already in `json_path` are kept (a long scale
    can run on its own), and the table and plot show them all, smallest first."""
    rows = {r["scale"]: r for r in (json.loads(json_path.read_text()) if json_path.is_file() else [])}
    for scale in scales:
        rows[scale] = run_scale(scale, root, full, epochs)
        print_table([rows[scale]])
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(ordered(rows), indent=2))  # kept as each scale ends
    if plot_path is not None:
        plot(ordered(rows), plot_path)
    return ordered(rows)


def ordered(rows: dict) -> list[dict]:
    return sorted(rows.values(), key=lambda r: (r["interactions"], r["items"]))
