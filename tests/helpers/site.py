"""A place to run ``doit`` as an operator does: recipes, a repository root, a cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[2]
STANDIN = Path(__file__).resolve().parents[1] / "bin" / "cvmfs_server"


class Site:
    def __init__(self, base: Path, repo: str = "test.cern.ch", publisher: str = "local"):
        self.base, self.repo, self.publisher = base, repo, publisher
        self.recipes = base / "recipes"
        self.root = base / "cvmfs"
        self.cache = base / "cache"
        for d in (self.recipes, self.root, self.cache):
            d.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ)
        self.env.update({"UNPACKED_RECIPES": str(self.recipes), "UNPACKED_ROOT": str(self.root),
                         "UNPACKED_CACHE": str(self.cache), "UNPACKED_PUBLISHER": publisher,
                         "UNPACKED_RETRY_ATTEMPTS": "3", "UNPACKED_RETRY_SECONDS": "10",
                         "HOME": str(base)})
        self.env.pop("UNPACKED_VERBOSITY", None)
        if publisher == "cvmfs":
            self.state = base / "standin"
            self.env.update({"UNPACKED_CVMFS_SERVER": str(STANDIN),
                             "UNPACKED_CVMFS_SPOOL": str(self.state / "spool"),
                             "CVMFS_STANDIN_ROOT": str(self.root),
                             "CVMFS_STANDIN_STATE": str(self.state),
                             "CVMFS_STANDIN_SPOOL": str(self.state / "spool")})
            self.standin("mkfs", repo)

    @property
    def repo_root(self) -> Path:
        return self.root / self.repo

    def recipe(self, images: list[str], name: str = "r.yaml", extra: str = "") -> Path:
        lines = "\n".join(f"  - '{i}'" for i in images)
        path = self.recipes / name
        path.write_text(f"version: 1\nuser: tester\ncvmfs_repo: {self.repo}\n{extra}"
                        f"input:\n{lines}\n")
        return path

    project = PROJECT

    def doit_argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "doit", *args]

    def doit(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(self.doit_argv(*args), cwd=PROJECT, env=self.env,
                              capture_output=True, text=True, timeout=timeout)

    def start(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "doit", *args], cwd=PROJECT,
                                env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)

    def standin(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(STANDIN), *args], env=self.env, capture_output=True,
                              text=True, check=True)

    def calls(self) -> list[list[str]]:
        log = self.state / "calls.log"
        if not log.exists():
            return []
        return [json.loads(line)["argv"] for line in log.read_text().splitlines()]

    def revision(self) -> int:
        if self.publisher == "cvmfs":
            return json.loads((self.state / f"{self.repo}.json").read_text())["revision"]
        path = self.repo_root / ".unpacked" / "published.json"
        return json.loads(path.read_text())["revision"] if path.exists() else 0

    def transaction_open(self) -> bool:
        if self.publisher == "cvmfs":
            return (self.state / "spool" / self.repo / "unpacked-transaction.json").exists()
        return (self.repo_root / ".unpacked" / "journal").exists()

    def close(self) -> None:
        if self.publisher == "cvmfs":
            subprocess.run(["umount", str(self.repo_root)], capture_output=True)
