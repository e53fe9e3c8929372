"""The default tiny builds ship with the package, so every machine loads the same weights.

A float build follows the CPU's kernels: the same code, world, seeds, threads and packages gave
tiny Qwen2-VL 93.1% of the E-VQA-mini answers on one machine (AVX-512) and 89.8% on another, and
editor settings and test bars chosen on one machine's builds failed on the other's. So the
default builds (each family's base build and its in-context stage) are tracked in git under
``SHIPPED``, in the cache's own layout (``<family>/<key>/``, as ``<cache>/backbones/<family>/
<key>/``) and in the Hugging Face layout the loaders read: safetensors files resharded below
``SHARD_BYTES`` (``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json``),
tokenizer, processor config and build report. ``manifest.json`` gives each build's key, the
machine that built it and every file's SHA-256.

A build whose key is shipped is copied into the cache (each file checked against its hash) and
never trained; any other key builds on this machine, and ``why_building`` says what differs from
the shipped build. ``benchmarks/rebuild_tiny.py`` (``make rebuild-tiny``) rebuilds, compares and,
with ``--ship``, writes a new shipped set (``ship``).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mmke.errors import MMKEError
from mmke.results.atomic import flatten

#: Where the shipped builds live (inside the package, so a wheel carries them too).
SHIPPED = Path(__file__).with_name("shipped")
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
#: Largest shard written. Tracked files must stay under 2 MB; a margin for the header.
SHARD_BYTES = 1_500_000
#: The settings a build answers to, written beside its report (``builder.cached_build``).
SETTINGS_FILE = "build_settings.json"
#: The marker of a finished build (``builder.DONE_MARKER``; here to avoid an import cycle).
REPORT_FILE = "pretrain_report.json"


class ShippedBuildError(MMKEError):
    """A shipped build is missing a file or a file does not match the manifest's hash."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class ShippedBuild:
    """One shipped build: ``<root>/<family>/<key>`` and its manifest entry."""

    root: Path
    family: str
    key: str
    files: dict[str, dict[str, Any]]  # relative path -> {"sha256": ..., "bytes": ...}
    built_on: dict[str, Any]

    @property
    def folder(self) -> Path:
        return self.root / self.family / self.key

    @property
    def settings(self) -> dict[str, Any]:
        path = self.folder / SETTINGS_FILE
        return json.loads(path.read_text()) if path.is_file() else {}


def read_manifest(root: Path = SHIPPED) -> dict[str, Any]:
    """The manifest of the shipped set in ``root``; an empty one where nothing ships."""
    path = root / MANIFEST
    if not path.is_file():
        return {"version": MANIFEST_VERSION, "shard_bytes": SHARD_BYTES, "builds": {}}
    manifest = json.loads(path.read_text())
    if manifest.get("version") != MANIFEST_VERSION:
        raise ShippedBuildError(f"{path}: manifest version {manifest.get('version')!r}, this "
                                f"code reads {MANIFEST_VERSION}; rewrite it with "
                                "`make rebuild-tiny ARGS=--ship`")
    return manifest


def _build(root: Path, entry: dict[str, Any]) -> ShippedBuild:
    return ShippedBuild(root, entry["family"], entry["key"], entry["files"], entry["built_on"])


def shipped_builds(root: Path = SHIPPED) -> list[ShippedBuild]:
    return [_build(root, entry) for entry in read_manifest(root)["builds"].values()]


def find_shipped(folder: Path, root: Path | None) -> ShippedBuild | None:
    """The shipped build that the cache folder ``<cache>/backbones/<family>/<key>`` answers to."""
    if root is None:
        return None
    entry = read_manifest(root)["builds"].get(f"{folder.parent.name}/{folder.name}")
    return None if entry is None else _build(root, entry)


def verify(build: ShippedBuild) -> None:
    """Every file of ``build`` is there with the manifest's SHA-256 (and nothing unlisted)."""
    present = {p.relative_to(build.folder).as_posix() for p in build.folder.rglob("*")
               if p.is_file()}
    if present - build.files.keys():
        raise ShippedBuildError(f"{build.folder}: files the manifest does not list: "
                                f"{sorted(present - build.files.keys())}; {_FIX}")
    for rel, meta in build.files.items():
        _check(build.folder / rel, meta)


_FIX = ("restore the shipped set with `git checkout -- mmke/backbones/tiny/shipped` (a checkout "
        "without its binary files, or with Git LFS pointers, has the wrong bytes), or build this "
        "machine's own with backbone.shipped=false")


def _check(path: Path, meta: dict[str, Any]) -> None:
    if not path.is_file():
        raise ShippedBuildError(f"{path}: missing from the shipped build; {_FIX}")
    got = sha256(path)
    if got != meta["sha256"]:
        raise ShippedBuildError(f"{path}: SHA-256 {got[:16]}… is not the manifest's "
                                f"{meta['sha256'][:16]}…; {_FIX}")


def copy_shipped(build: ShippedBuild, tmp: Path) -> str:
    """Copy ``build`` into ``tmp`` (a cache folder being filled), checking every file against
    the manifest; returns the build report's text (the cache's marker of a finished build)."""
    for rel, meta in build.files.items():
        source = build.folder / rel
        _check(source, meta)
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        # copyfile, not copy2: an installed package's files may be read-only
        shutil.copyfile(source, tmp / rel)
    report = tmp / REPORT_FILE
    text = report.read_text()
    report.unlink()  # written last by the caller, as the marker
    return text


def settings_difference(shipped: dict[str, Any], here: dict[str, Any]) -> list[str]:
    """``name: shipped -> here`` for every setting in which two builds' settings differ."""
    a, b = flatten(shipped), flatten(here)
    return [f"{k}: {a.get(k, '(unset)')!r} shipped, {b.get(k, '(unset)')!r} here"
            for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]


def why_building(folder: Path, settings: dict[str, Any], root: Path | None) -> str:
    """Why ``folder``'s build is made on this machine rather than copied from ``root``."""
    family, key = folder.parent.name, folder.name
    if root is None:
        return f"{family} {key}: backbone.shipped=false, building on this machine"
    kind = _kind(key)
    same = [b for b in shipped_builds(root) if b.family == family and _kind(b.key) == kind]
    if not same:
        return f"{family} {key}: the package ships no {kind} build of {family}; building here"
    nearest = min(same, key=lambda b: len(settings_difference(b.settings, settings)))
    diff = settings_difference(nearest.settings, settings)
    shown = "; ".join(diff[:6]) + ("; …" if len(diff) > 6 else "")
    return (f"{family} {key}: no shipped build answers to these settings (the shipped "
            f"{nearest.key} differs in {shown or 'its code version only'}); building here")


def _kind(key: str) -> str:
    return "in-context" if "-context-" in key else "base"


# --- resharding and shipping -------------------------------------------------------------------

_SHARD = re.compile(r"^(?P<stem>.+)-\d{5}-of-\d{5}\.safetensors$")


def reshard(source: Path, target: Path, max_bytes: int = SHARD_BYTES) -> None:
    """Write the safetensors file ``source`` as Hugging Face shards beside ``target``
    (``<stem>-00001-of-0000n.safetensors`` and ``<stem>.safetensors.index.json``), each under
    ``max_bytes``; a file already small enough is copied as it is."""
    if source.stat().st_size <= max_bytes:
        shutil.copyfile(source, target)
        return
    with safe_open(str(source), framework="pt") as f:
        metadata = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    groups: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        # the tensor's bytes and its header entry (name, dtype, shape, offsets as JSON)
        n = t.numel() * t.element_size() + len(name) + 128
        if n + 1024 > max_bytes:
            raise ShippedBuildError(f"{source}: tensor {name} ({n} bytes) does not fit a shard "
                                    f"of {max_bytes} bytes; it cannot be shipped")
        if size + n + 1024 > max_bytes and groups[-1]:
            groups.append({})
            size = 0
        groups[-1][name] = t
        size += n
    stem = target.name[: -len(".safetensors")]
    weight_map = {}
    for i, group in enumerate(groups, 1):
        shard = f"{stem}-{i:05d}-of-{len(groups):05d}.safetensors"
        save_file(group, str(target.parent / shard), metadata=metadata)
        if (target.parent / shard).stat().st_size >= max_bytes:
            raise ShippedBuildError(f"{target.parent / shard}: a shard over {max_bytes} bytes")
        weight_map.update({name: shard for name in group})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
             "weight_map": weight_map}
    (target.parent / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2))


def shippable_copy(build: Path, out: Path, max_bytes: int = SHARD_BYTES) -> dict[str, dict]:
    """Copy the finished cache build ``build`` into ``out``, resharding its safetensors files;
    returns each file's SHA-256 and size, relative to ``out``."""
    if not (build / REPORT_FILE).is_file():
        raise ShippedBuildError(f"{build}: no {REPORT_FILE}, so the build is unfinished; "
                                "it cannot be shipped")
    if not (build / SETTINGS_FILE).is_file():
        raise ShippedBuildError(f"{build}: no {SETTINGS_FILE}; load the build once with this "
                                "code (it writes the file) before shipping it")
    for path in sorted(build.rglob("*")):
        if not path.is_file() or path.name.startswith(".") or _SHARD.match(path.name):
            continue
        rel = path.relative_to(build)
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".safetensors":
            reshard(path, out / rel, max_bytes)
        elif path.name.endswith(".safetensors.index.json"):
            continue  # a sharded build: its shards are merged back and written anew
        else:
            shutil.copyfile(path, out / rel)
    files = {}
    for path in sorted(out.rglob("*")):
        if path.is_file():
            if path.stat().st_size >= 2_000_000:
                raise ShippedBuildError(f"{path}: {path.stat().st_size} bytes; every shipped "
                                        "file must be under 2 MB")
            files[path.relative_to(out).as_posix()] = {"sha256": sha256(path),
                                                        "bytes": path.stat().st_size}
    return files


def this_machine() -> dict[str, Any]:
    """What a build depends on besides its settings: CPU, its vector extensions, packages."""
    import transformers

    cpu, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        text = cpuinfo.read_text()
        names = re.findall(r"^model name\s*:\s*(.+)$", text, re.M)
        cpu = names[0].strip() if names else cpu
        found = re.findall(r"^flags\s*:\s*(.+)$", text, re.M)
        flags = set(found[0].split()) if found else set()
    from mmke.backbones.tiny.builder import BUILD_THREADS

    return {"cpu": cpu, "cores": os.cpu_count(),
            "avx512": sorted(f for f in flags if f.startswith("avx512")),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "build_threads": BUILD_THREADS}


def ship(builds: list[Path], root: Path = SHIPPED, machine: dict[str, Any] | None = None
         ) -> dict[str, Any]:
    """Make ``builds`` (finished cache folders ``<cache>/backbones/<family>/<key>``) the shipped
    set: resharded copies and a new manifest, made in a temporary folder and swapped in whole
    (a whole set, so no stage is shipped beside a base it was not trained from)."""
    machine = machine or this_machine()
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".shipping-", dir=root.parent))
    try:
        entries = {}
        for build in builds:
            name = f"{build.parent.name}/{build.name}"
            entries[name] = {"family": build.parent.name, "key": build.name, "built_on": machine,
                             "files": shippable_copy(build, tmp / name)}
        manifest = {"version": MANIFEST_VERSION, "shard_bytes": SHARD_BYTES,
                    "builds": dict(sorted(entries.items()))}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        old = root.with_name(root.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if root.exists():
            os.replace(root, old)
        os.replace(tmp, root)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest
