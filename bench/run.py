#!/usr/bin/env python3
"""The benchmark suite: realistic images, each measurement beside its peer, in one run.

    python3 bench/run.py            # full run (builds images once, ~20 min), writes RESULTS.md
    python3 bench/run.py --quick    # tiny images, one run: what the test suite runs

Images are built once and kept in bench/images/ (git-ignored) together with the storage of
the benchmark's own docker-registry. Timings are wall-clock medians of --runs runs; ours and
its peer alternate within each run so that drift hits both.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parent
sys.path.insert(0, str(PROJECT / "tests"))
sys.path.insert(0, str(HERE))

from build import build_all  # noqa: E402
from helpers.faults import FaultProxy  # noqa: E402
from helpers.registry import Registry  # noqa: E402


def sh(cmd: str, cwd: Path | None = None) -> None:
    done = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], cwd=cwd, capture_output=True,
                          text=True)
    if done.returncode:
        raise RuntimeError(f"{cmd}: {done.stderr.strip()[-500:]}")


def fresh(path: Path) -> Path:
    if path.exists():
        subprocess.run(["rm", "-rf", str(path)], check=True)
    path.mkdir(parents=True)
    return path


class TreeRss:
    """Peak memory of a process and all its descendants (sum of their PSS, so that pages
    forked workers share are counted once), sampled every 20 ms."""

    def __init__(self, pid: int):
        self.pid, self.peak, self.done = pid, 0, False
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _children(self) -> dict[int, int]:
        parents = {}
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                try:
                    with open(f"/proc/{entry.name}/stat") as f:
                        parents[int(entry.name)] = int(f.read().rsplit(")", 1)[1].split()[1])
                except (OSError, ValueError, IndexError):
                    pass
        return parents

    def _loop(self) -> None:
        while not self.done:
            parents = self._children()
            tree, frontier = {self.pid}, [self.pid]
            while frontier:
                p = frontier.pop()
                for child, parent in parents.items():
                    if parent == p and child not in tree:
                        tree.add(child)
                        frontier.append(child)
            total = 0
            for p in tree:        # PSS: pages shared by forked workers are counted once
                try:
                    with open(f"/proc/{p}/smaps_rollup") as f:
                        for line in f:
                            if line.startswith("Pss:"):
                                total += int(line.split()[1])
                except OSError:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(0.02)

    def stop(self) -> int:
        self.done = True
        self.thread.join()
        return self.peak


class Bench:
    def __init__(self, args):
        self.args = args
        self.images = Path(args.images).resolve()
        self.work = fresh(Path(args.work).resolve())
        self.images.mkdir(parents=True, exist_ok=True)
        name = "registry-quick" if args.quick else "registry"
        self.registry = Registry(self.images / name, "none")
        self.host = self.registry.host
        self.info = build_all(self.images, self.host, args.quick, args.many)
        self.samples: dict[str, list[float]] = {}
        self.notes: dict[str, str] = {}

    # -- the commands measured ----------------------------------------------------------------

    def ours(self, label: str, images: list[str], mode: str = "hardlink", jobs: str | None = None,
             host: str | None = None, keep: bool = False, args: tuple = (),
             memory: bool = False) -> float:
        site = self.work / f"site-{label}"
        if not keep:
            fresh(site)
        (site / "recipes").mkdir(exist_ok=True)
        host = host or self.host
        inputs = "\n".join(f"  - 'http://{host}/{i}'" for i in images)
        (site / "recipes" / "r.yaml").write_text(
            f"version: 1\nuser: bench\ncvmfs_repo: bench.cern.ch\ninput:\n{inputs}\n")
        env = dict(os.environ, UNPACKED_RECIPES=str(site / "recipes"),
                   UNPACKED_ROOT=str(site / "cvmfs"), UNPACKED_CACHE=str(site / "cache"),
                   UNPACKED_FLATTEN=mode, HOME=str(site))
        cmd = [sys.executable, "-m", "doit", *args]
        if jobs:
            cmd += ["-n", jobs]
        start = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=PROJECT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        rss = TreeRss(proc.pid) if memory else None
        out, err = proc.communicate()
        seconds = time.monotonic() - start
        if rss:
            self.record("peak memory, cold convert of app (MiB)", rss.stop() / 1024)
        if proc.returncode not in (0, 1) or (proc.returncode == 1 and not args):
            raise RuntimeError(f"{' '.join(cmd)} -> {proc.returncode}: {err[-2000:]}{out[-500:]}")
        self.last_out = out
        return seconds

    def peer(self, repo: str) -> float:
        target = fresh(self.work / "peer")
        start = time.monotonic()
        sh(f"skopeo copy --quiet --src-tls-verify=false docker://{self.host}/{repo} "
           f"oci:{target}/oci:x && umoci unpack --rootless --image {target}/oci:x "
           f"{target}/bundle")
        return time.monotonic() - start

    def floor(self, repo: str, layers: list[str], copy: bool) -> float:
        target = fresh(self.work / "floor")
        name = repo.split(":")[0]
        start = time.monotonic()
        for i, digest in enumerate(layers):
            (target / f"l{i}").mkdir()
            sh(f"curl -sf http://{self.host}/v2/{name}/blobs/{digest} | gzip -dc | "
               f"tar -x -C {target}/l{i}")
        (target / "out").mkdir()
        flag = "-a" if copy else "-al"
        for i in range(len(layers)):
            sh(f"cp {flag} --remove-destination {target}/l{i}/. {target}/out/")
        return time.monotonic() - start

    def heads(self, tags: list[str]) -> float:
        urls = " ".join(f"http://{self.host}/v2/bench/many/manifests/{t}" for t in tags)
        accept = "application/vnd.oci.image.manifest.v1+json"
        start = time.monotonic()
        sh(f"curl -sf -o /dev/null -I -H 'Accept: {accept}' {urls}")
        return time.monotonic() - start

    def record(self, label: str, value: float) -> None:
        self.samples.setdefault(label, []).append(value)

    # -- the measurements ---------------------------------------------------------------------

    def run(self) -> None:
        app, layers = "bench/app:v1", self.info["app_layers"]
        for _ in range(self.args.runs):
            self.record("cold convert app, hardlink (ours)",
                        self.ours("app", [app], "hardlink", memory=True))
            self.record("cold convert app: skopeo copy + umoci unpack", self.peer(app))
            self.record("cold convert app: floor, curl|gzip|tar + cp -al",
                        self.floor(app, layers, copy=False))
            self.record("cold convert app, copy (ours)", self.ours("app", [app], "copy"))
            self.record("cold convert app: floor, curl|gzip|tar + cp -a",
                        self.floor(app, layers, copy=True))
        shutil.rmtree(self.work / "peer", ignore_errors=True)
        shutil.rmtree(self.work / "floor", ignore_errors=True)
        shutil.rmtree(self.work / "site-app", ignore_errors=True)
        self.variants()
        self.many()

    def variants(self) -> None:
        names = [f"bench/variants:variant{v}" for v in range(5)]
        proxy = FaultProxy(self.host)
        try:
            for _ in range(self.args.runs):
                proxy.clear()
                self.record("variants: cold convert of 5, -n 2",
                            self.ours("variants", names, jobs="2", host=proxy.host))
                got = proxy.count("GET", "/blobs/sha256:")
                base = self.info["app_layers"][0]
                blobs = [(p.rsplit("/", 1)[1], size) for m, p, _, size in proxy.received
                         if m == "GET" and "/blobs/sha256:" in p]
                total, unique = sum(s for _, s in blobs), sum(dict(blobs).values())
                self.notes["variants"] = (f"{got} blob GETs for 5 images (5 configs + 1 shared "
                                          f"base + 5 own layers = 11 expected); base fetched "
                                          f"{proxy.count('GET', base)} time(s); {total:,} "
                                          f"bytes downloaded, the unique blobs are "
                                          f"{unique:,} bytes")
                self.record("variants: cold convert of 5, -n 1",
                            self.ours("variants", names, jobs="1"))
        finally:
            proxy.stop()

    def many(self) -> None:
        tags = self.info["many"]
        names = [f"bench/many:{t}" for t in tags]
        start = time.monotonic()
        self.ours("many", names)
        self.notes["many"] = (f"{len(tags)} images, {5 * len(tags)} layer tasks: cold convert "
                              f"took {time.monotonic() - start:.1f} s (once)")
        revision = self.work / "site-many" / "cvmfs" / "bench.cern.ch" / ".unpacked" / \
            "published.json"
        before = revision.read_text()
        for _ in range(self.args.runs):
            self.record(f"no-op run, {len(tags)} images (ours)",
                        self.ours("many", names, keep=True))
            self.record(f"no-op peer: {len(tags)} manifest HEADs with one curl",
                        self.heads(tags))
            self.record(f"doit list, {len(tags)} images",
                        self.ours("many", names, keep=True, args=("list",)))
            self.record(f"doit list --all -s, {len(tags)} images",
                        self.ours("many", names, keep=True, args=("list", "--all", "-s")))
            self.record(f"doit info image:..., {len(tags)} images",
                        self.ours("many", names, keep=True,
                                  args=("info", f"image:{self.host}/{names[0]}")))
        opened = revision.read_text() != before
        self.notes["no-op"] = ("a transaction WAS opened by a no-op run" if opened else
                               "no transaction opened by the no-op runs (revision unchanged)")

    # -- the report ---------------------------------------------------------------------------

    def report(self) -> str:
        def med(label):
            return statistics.median(self.samples[label])

        versions = {}
        for tool, flag in (("skopeo", "--version"), ("umoci", "--version"),
                           ("docker-registry", "--version")):
            out = subprocess.run([tool, flag], capture_output=True, text=True).stdout.strip()
            versions[tool] = out.splitlines()[0] if out else "?"
        import doit
        lines = ["# Benchmark results", "",
                 f"Made by `python3 bench/run.py{' --quick' if self.args.quick else ''}` on "
                 f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", "",
                 f"- machine: {os.cpu_count()} cores, "
                 f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, "
                 f"{platform.platform()}",
                 f"- Python {platform.python_version()}, doit {doit.__version__}",
                 *[f"- {tool}: {v}" for tool, v in versions.items()],
                 f"- runs per measurement: {self.args.runs}", "",
                 "| measurement | median | min – max |", "|---|---|---|"]
        for label, values in self.samples.items():
            unit = "MiB" if "MiB" in label else "s"
            lines.append(f"| {label} | {med(label):.2f} {unit} | {min(values):.2f} – "
                         f"{max(values):.2f} |")
        lines += ["", "## Ratios and targets", "",
                  "| comparison | ratio | target | met |", "|---|---|---|---|"]
        ours_h = med("cold convert app, hardlink (ours)")
        ours_c = med("cold convert app, copy (ours)")
        peer = med("cold convert app: skopeo copy + umoci unpack")
        floor_h = med("cold convert app: floor, curl|gzip|tar + cp -al")
        floor_c = med("cold convert app: floor, curl|gzip|tar + cp -a")
        many = len(self.info["many"])
        noop = med(f"no-op run, {many} images (ours)")
        listing = med(f"doit list, {many} images")
        memory = max(self.samples["peak memory, cold convert of app (MiB)"])
        rows = [("hardlink / skopeo+umoci", ours_h / peer, "≤ 0.6", ours_h / peer <= 0.6),
                ("hardlink / its floor", ours_h / floor_h, "≤ 1.3", ours_h / floor_h <= 1.3),
                ("copy / skopeo+umoci", ours_c / peer, "≤ 1.0", ours_c / peer <= 1.0),
                ("copy / its floor", ours_c / floor_c, "≤ 1.3", ours_c / floor_c <= 1.3)]
        for name, ratio, target, ok in rows:
            lines.append(f"| {name} | {ratio:.2f} | {target} | {'yes' if ok else 'NO'} |")
        lines += [f"| no-op run, {many} images | {noop:.2f} s | ≤ 3 s | "
                  f"{'yes' if noop <= 3 else 'NO'} |",
                  f"| doit list, {many} images | {listing:.2f} s | ≤ 1 s | "
                  f"{'yes' if listing <= 1 else 'NO'} |",
                  f"| peak memory, cold convert of app | {memory:.0f} MiB | ≤ 150 MiB | "
                  f"{'yes' if memory <= 150 else 'NO'} |", "", "## Notes", ""]
        lines += [f"- {key}: {text}" for key, text in self.notes.items()]
        return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny images, one run")
    parser.add_argument("--runs", type=int, default=None)
    parser.add_argument("--many", type=int, default=None, help="images of the no-op recipe")
    parser.add_argument("--images", default=str(HERE / "images"))
    parser.add_argument("--work", default=str(HERE / "work"))
    parser.add_argument("--out", default=str(HERE / "RESULTS.md"))
    args = parser.parse_args()
    args.runs = args.runs or (1 if args.quick else 3)
    args.many = args.many or (20 if args.quick else 1000)
    bench = Bench(args)
    try:
        bench.run()
        text = bench.report()
    finally:
        bench.registry.stop()
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
