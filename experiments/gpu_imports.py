"""Which installed distributions the GPU session imports, and whether the GPU machine has them.

The GPU machine (device README, KINDS.md) has torch, triton, lightning, transformers and a long
list of other packages, no package index, and takes the rest as wheels installed with --no-deps.
`trace` runs a module or script as ``__main__`` and, at exit (also after a failure), writes the
distributions that own every module it imported. With GPU_SESSION_HIDE=1 (the dry run sets it)
it first hides every installed distribution that neither list covers, as if on the GPU machine:
an import the bundle lacks then fails here, on CPU, instead of there. `check` compares the union of such traces with
experiments/gpu_machine_packages.txt plus experiments/gpu_wheels.txt and fails naming what
neither covers, so that the wheel bundle stays complete and small as the code changes.

    python experiments/gpu_imports.py trace OUT.json -m lifelong_moe.bench dispatch ...
    python experiments/gpu_imports.py check OUT.json [OUT2.json ...] [--json REPORT]
"""

from __future__ import annotations

import argparse
import atexit
import importlib.abc
import json
import os
import re
import runpy
import sys
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MACHINE_PACKAGES = HERE / "gpu_machine_packages.txt"
WHEELS = HERE / "gpu_wheels.txt"
OURS = {"lifelong-moe"}
# Installed here only as dependencies of a newer version of a package the machine has in an older
# one (huggingface-hub 2.x here imports httpx2, which imports truststore and
# socks; the machine's 1.33 uses httpx, which it has).
VERSION_SKEW = {"httpx2", "httpcore2", "truststore", "socks", "sockshandler", "pysocks"}


def canonical(name: str) -> str:
    """PEP 503 normalised distribution name (hydra_core, Hydra-Core -> hydra-core)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def listed(path: Path) -> dict[str, str]:
    """Names (canonical) -> version pin or '' from a list file: one name[==version] a line, # comments."""
    out = {}
    for line in path.read_text().splitlines():
        entry = line.split("#", 1)[0].strip()
        if entry:
            name, _, version = entry.partition("==")
            out[canonical(name)] = version.strip()
    return out


def imported_modules() -> dict[str, list[str]]:
    """Imported top-level module -> the installed distributions that own it (several share
    namespaces: google.* belongs to protobuf and google-auth; mlflow to mlflow and -skinny)."""
    owners = metadata.packages_distributions()
    found = {}
    for top in {module.partition(".")[0] for module in list(sys.modules)}:
        dists = sorted({canonical(d) for d in owners.get(top, [])} - OURS)
        in_checkout = (REPO / top).exists() or (REPO / f"{top}.py").exists()
        if dists and not in_checkout:
            found[top] = dists
    return dict(sorted(found.items()))


def versions(dists: set[str]) -> dict[str, str]:
    out = {}
    for dist in sorted(dists):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = ""
    return out


class Hide(importlib.abc.MetaPathFinder):
    """The interpreter's finders, except that a hidden top-level module is not found.

    As on a machine that lacks it: ``importlib.util.find_spec`` answers None (availability probes
    such as transformers' ``is_kernels_available`` then say no and go on) and an import raises
    ModuleNotFoundError. Raising from ``find_spec`` instead would break those probes, and
    returning None alone would let the next finder find it: so this one wraps the others.
    """

    def __init__(self, hidden: set[str], finders: list) -> None:
        self.hidden = hidden
        self.finders = finders

    def find_spec(self, fullname, path=None, target=None):  # noqa: ANN001 - importlib protocol
        if fullname.partition(".")[0] in self.hidden:
            return None
        for finder in self.finders:
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find else None
            if spec is not None:
                return spec
        return None

    def find_distributions(self, *args, **kwargs):  # noqa: ANN002, ANN003 - importlib.metadata
        """Package metadata as before (importlib.metadata asks every finder on sys.meta_path)."""
        for finder in self.finders:
            if hasattr(finder, "find_distributions"):
                yield from finder.find_distributions(*args, **kwargs)

    def invalidate_caches(self) -> None:
        for finder in self.finders:
            if hasattr(finder, "invalidate_caches"):
                finder.invalidate_caches()


def machine_view_hidden_modules() -> set[str]:
    """Top-level modules that only distributions outside the machine's list + the wheels own."""
    covered = set(listed(MACHINE_PACKAGES)) | set(listed(WHEELS)) | OURS | VERSION_SKEW
    hidden = set()
    for module, dists in metadata.packages_distributions().items():
        in_checkout = (REPO / module).exists() or (REPO / f"{module}.py").exists()  # tests/
        if not in_checkout and not any(canonical(d) in covered for d in dists):
            hidden.add(module)
    return hidden


def trace(out: Path, target: list[str]) -> None:
    """Run `target` (``-m module args`` or ``script args``) as __main__; write its imports at exit."""
    if os.environ.get("GPU_SESSION_HIDE") == "1":
        sys.meta_path[:] = [Hide(machine_view_hidden_modules(), list(sys.meta_path))]

    def write() -> None:
        modules = imported_modules()
        dists = {d for owners in modules.values() for d in owners}
        out.write_text(
            json.dumps({"argv": target, "modules": modules, "distributions": versions(dists)})
        )

    atexit.register(write)
    if target[0] == "-m":
        sys.argv = [target[1], *target[2:]]
        runpy.run_module(target[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(target)
        runpy.run_path(target[0], run_name="__main__")


def check(traces: list[Path]) -> dict:
    """Distributions imported by the traces that neither the machine nor the wheels provide."""
    machine, wheels = set(listed(MACHINE_PACKAGES)), set(listed(WHEELS))
    covered = machine | wheels | VERSION_SKEW
    modules: dict[str, list[str]] = {}
    for path in traces:
        modules |= json.loads(path.read_text())["modules"]
    used = {top: [d for d in owners if d in covered] for top, owners in modules.items()}
    from_machine = {d for owners in used.values() for d in owners if d in machine}
    from_wheels = {d for owners in used.values() for d in owners if d in wheels}
    missing = {top: owners for top, owners in modules.items() if not used[top]}
    return {
        "modules": modules,
        "from_machine": sorted(from_machine),
        "from_wheels": sorted(from_wheels),
        "missing": missing,  # module -> its owners, none of which the machine or wheels provide
        "wheels_not_imported": sorted(wheels - from_wheels),
        "ok": not missing,
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "trace":  # everything after OUT belongs to the target
        if len(argv) < 3:
            print("usage: gpu_imports.py trace OUT.json (-m MODULE | SCRIPT) [ARGS...]")
            return 2
        trace(Path(argv[1]), argv[2:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check", help="the traces against the machine's packages + the wheels")
    p.add_argument("traces", nargs="+", type=Path)
    p.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    report = check(args.traces)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    print(f"imported from the machine: {', '.join(report['from_machine'])}")
    print(f"imported from the wheels:  {', '.join(report['from_wheels'])}")
    if report["wheels_not_imported"]:
        print(f"wheels nothing imported (drop them?): {', '.join(report['wheels_not_imported'])}")
    if report["missing"]:
        gone = ", ".join(f"{m} ({'/'.join(o)})" for m, o in report["missing"].items())
        print(f"MISSING (neither on the machine nor in the wheels): {gone}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
