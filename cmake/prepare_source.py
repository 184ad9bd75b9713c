"""Fetch, verify, extract and patch the pinned llama-cpp-python sdist.

CMake runs this at configure time; it is also importable so tests can check each
step on its own.  The output tree is reused while the sdist hash and the patches
are unchanged (a stamp file records both), so incremental builds keep their
timestamps and only recompile what changed.

Usage: prepare_source.py OUT_DIR
Environment:
  INFMLLM_LLAMA_SOURCE  an already downloaded sdist (.tar.gz, hash-checked) or an
                        extracted sdist directory (offline / air-gapped builds); a
                        directory that `patch_tree` already patched (its PATCHED_MARKER
                        names this checkout's patch set) is used as it is, so a machine
                        without git can build from it.
  INFMLLM_CACHE_DIR     where the downloaded sdist is kept (default ~/.cache/infmllm-gguf).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
UPSTREAM = json.loads((ROOT / "cmake" / "upstream.json").read_text())
PATCH_DIR = ROOT / "patches"
# patches/ paths are relative to llama.cpp's root inside the sdist
LLAMA_SUBDIR = Path("vendor/llama.cpp")

# Parts of the sdist the build never reads, as paths relative to the sdist root: an entry
# ending in "/" is a folder and all below it, any other entry one exact path.  The one list
# both the tarball and the directory source go through, so they yield the same tree;
# folders of the same name elsewhere (src/models/, tools/mtmd/models/) are kept.  The .git
# entries matter: the submodule's .git file points to a repository the sdist lacks, and
# any git command run in the tree (git apply) would fail on it.
SKIP = (
    ".git",
    ".git/",
    "vendor/llama.cpp/.git",
    "vendor/llama.cpp/.git/",
    "vendor/llama.cpp/models/",
    "vendor/llama.cpp/docs/",
    "vendor/llama.cpp/media/",
    "vendor/llama.cpp/examples/",
    "vendor/llama.cpp/tests/",
    "vendor/llama.cpp/benches/",
    "vendor/llama.cpp/tools/server/",
    "vendor/llama.cpp/tools/ui/",
    "llama_cpp/server/",
    "docs/",
    "examples/",
    "tests/",
)


def is_skipped(rel: str, is_dir: bool) -> bool:
    """Whether the sdist-relative path rel (a folder when is_dir) stays out of the source tree."""
    path = rel + "/" if is_dir else rel
    return any(path.startswith(entry) if entry.endswith("/") else path == entry for entry in SKIP)


# Private name of the bundled llama-cpp-python package: it never shadows a
# llama-cpp-python the user installed for other work.
VENDORED_PACKAGE = "infmllm_gguf._llama_cpp"


class SourceError(RuntimeError):
    """The pinned source could not be fetched, verified or patched."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_sdist(path: Path, expected: str = UPSTREAM["sha256"]) -> None:
    actual = sha256_of(path)
    if actual != expected:
        raise SourceError(
            f"sha256 mismatch for {path}: expected {expected}, got {actual}. "
            "The file is corrupt or not the pinned "
            f"{UPSTREAM['package']}=={UPSTREAM['version']} sdist; delete it and rebuild."
        )


def cache_dir() -> Path:
    """Where the downloaded sdist is kept: INFMLLM_CACHE_DIR, else ~/.cache/infmllm-gguf."""
    return Path(os.environ.get("INFMLLM_CACHE_DIR") or Path.home() / ".cache" / "infmllm-gguf")


def download_sdist(cache_dir: Path) -> Path:
    """Download the pinned sdist with pip (the only registry client we may use)."""
    target = cache_dir / UPSTREAM["sdist"]
    if target.is_file() and sha256_of(target) == UPSTREAM["sha256"]:
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            "--no-build-isolation",
            "--disable-pip-version-check",
            "-d",
            tmp,
            f"{UPSTREAM['package']}=={UPSTREAM['version']}",
        ]
        print("infmllm-gguf: downloading", UPSTREAM["sdist"], flush=True)
        result = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / UPSTREAM["sdist"]
        if result.returncode != 0 or not got.is_file():
            raise SourceError(
                f"could not download {UPSTREAM['package']}=={UPSTREAM['version']} with pip:\n"
                f"{result.stdout[-2000:]}{result.stderr[-2000:]}\n"
                "Offline? Set INFMLLM_LLAMA_SOURCE to a downloaded sdist or extracted tree."
            )
        verify_sdist(got)
        os.replace(got, target)
    return target


def extract_sdist(sdist: Path, dest: Path) -> None:
    top = UPSTREAM["sdist"].removesuffix(".tar.gz") + "/"
    with tarfile.open(sdist, "r:gz") as tar:
        members = []
        for member in tar.getmembers():
            if not member.name.startswith(top):
                continue
            rel = member.name[len(top) :]
            if not rel or not (member.isfile() or member.isdir()) or is_skipped(rel, member.isdir()):
                continue
            member.name = rel
            members.append(member)
        kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(dest, members=members, **kwargs)


def copy_tree(src: Path, dest: Path) -> None:
    if not (src / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file():
        raise SourceError(f"{src} is not an extracted {UPSTREAM['package']} sdist (no vendor/llama.cpp)")
    init = (src / "llama_cpp" / "__init__.py").read_text()
    if f'__version__ = "{UPSTREAM["version"]}"' not in init:
        raise SourceError(f"{src} is not {UPSTREAM['package']} {UPSTREAM['version']}")

    def ignore(folder: str, names: list[str]) -> set[str]:
        base = Path(folder).relative_to(src).as_posix()
        prefix = "" if base == "." else base + "/"
        return {name for name in names if is_skipped(prefix + name, Path(folder, name).is_dir())}

    shutil.copytree(src, dest, ignore=ignore, dirs_exist_ok=True)


# --- patch application -------------------------------------------------------------
# git apply, not a hand-written applier and not patch(1): it checks every hunk's line
# counts (a truncated patch is "corrupt"), applies with no fuzz, creates and deletes
# files, and its --check pass lets a failing patch stop before anything is written.


def _git_apply(args: list[str], patch_file: Path, tree: Path) -> subprocess.CompletedProcess[str]:
    # The tree may lie inside some git checkout (our build dir does): stop git from finding
    # it, or paths would be taken relative to that checkout and files outside cwd skipped.
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env["GIT_CEILING_DIRECTORIES"] = str(tree.resolve().parent)
    try:
        return subprocess.run(
            ["git", "apply", *args, str(patch_file.resolve())],
            cwd=tree,
            env=env,
            capture_output=True,
            text=True,
        )
    except FileNotFoundError as exc:
        raise SourceError("git is needed to apply patches/ (git apply) and was not found") from exc


def apply_patch(patch_file: Path, tree: Path) -> None:
    """Apply one patch to tree, all of it or (on any mismatch) nothing, naming it on failure."""
    for args in (["--check"], []):
        result = _git_apply(args, patch_file, tree)
        if result.returncode != 0:
            reason = (result.stderr or result.stdout).strip()
            raise SourceError(
                f"{patch_file.name} does not apply to the pinned source: {reason}"
                if args
                else f"{patch_file.name}: git apply failed after a clean check: {reason}"
            )


def patch_targets(patch_file: Path) -> list[str]:
    """Paths (relative to llama.cpp's root) that patch_file touches."""
    result = _git_apply(["--numstat"], patch_file, patch_file.parent)
    if result.returncode != 0:
        raise SourceError(f"{patch_file.name} is not a valid patch: {result.stderr.strip()}")
    return [line.split("\t", 2)[2] for line in result.stdout.splitlines() if line]


def patch_files() -> list[Path]:
    return sorted(PATCH_DIR.glob("*.patch"))


# --- the bundled Python layer ---------------------------------------------------

_IMPORT_RULES = [
    (re.compile(r"^(\s*)import llama_cpp$", re.M), rf"\1import {VENDORED_PACKAGE} as llama_cpp"),
    (re.compile(r"^(\s*)import llama_cpp\.", re.M), rf"\1import {VENDORED_PACKAGE}."),
    (re.compile(r"^(\s*)from llama_cpp(\.| )", re.M), rf"\1from {VENDORED_PACKAGE}\2"),
    # Our copy must never pick up a library meant for the user's llama-cpp-python.
    (re.compile(r"LLAMA_CPP_LIB_PATH"), "INFMLLM_GGUF_LIB_PATH"),
]


def vendor_python_package(src: Path, dest: Path) -> None:
    """Copy llama-cpp-python's Python layer under a private package name."""
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("server", "lib", "__pycache__"))
    for py in dest.rglob("*.py"):
        text = py.read_text()
        for pattern, repl in _IMPORT_RULES:
            text = pattern.sub(repl, text)
        py.write_text(text)


# --- driver ----------------------------------------------------------------------


def patch_set_id() -> str:
    """Names the patches (and this script, which applies them) of this checkout."""
    digest = hashlib.sha256()
    for patch in patch_files():
        digest.update(patch.name.encode() + b"\0" + patch.read_bytes())
    digest.update((ROOT / "cmake" / "prepare_source.py").read_bytes())
    return digest.hexdigest()


def stamp_for(sdist_id: str) -> str:
    return hashlib.sha256(f"{sdist_id}\0{patch_set_id()}".encode()).hexdigest()


# In the root of an extracted sdist that patch_tree patched: the patch set's id.
PATCHED_MARKER = ".infmllm-patched"


def patch_tree(tree: Path) -> None:
    """Apply patches/ to an extracted sdist tree in place and mark it, for a build on a
    machine without git (scripts/gpu_prepare.sh)."""
    for patch in patch_files():
        apply_patch(patch, tree / LLAMA_SUBDIR)
    (tree / PATCHED_MARKER).write_text(patch_set_id())


def _patched_already(source: Path) -> bool:
    marker = source / PATCHED_MARKER
    if not marker.is_file():
        return False
    if marker.read_text() != patch_set_id():
        raise SourceError(
            f"{source} was patched for another patch set than this checkout's patches/ "
            "(prepare it again: scripts/gpu_prepare.sh)"
        )
    return True


def prepare(out: Path) -> Path:
    """Make OUT/src (patched sdist tree) and OUT/python (bundled package); return OUT/src."""
    override = os.environ.get("INFMLLM_LLAMA_SOURCE")
    if override and Path(override).is_dir():
        source, sdist_id = Path(override), f"dir:{Path(override).resolve()}"
    else:
        source = Path(override) if override else download_sdist(cache_dir())
        if not source.is_file():
            raise SourceError(f"INFMLLM_LLAMA_SOURCE={override} does not exist")
        verify_sdist(source)
        sdist_id = UPSTREAM["sha256"]

    src = out / "src"
    stamp_file = out / "stamp"
    stamp = stamp_for(sdist_id)
    if stamp_file.is_file() and stamp_file.read_text() == stamp and src.is_dir():
        return src

    staging = out / "src.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    if source.is_dir():
        copy_tree(source, staging)
    else:
        extract_sdist(source, staging)
    if source.is_dir() and _patched_already(source):
        print(f"infmllm-gguf: {source} is patched already ({PATCHED_MARKER})", flush=True)
    else:
        for patch in patch_files():
            print(f"infmllm-gguf: applying {patch.name}", flush=True)
            apply_patch(patch, staging / LLAMA_SUBDIR)
    vendor_python_package(staging / "llama_cpp", out / "python" / "_llama_cpp")

    if src.exists():
        _sync_changed(staging, src)
        shutil.rmtree(staging)
    else:
        staging.rename(src)
    stamp_file.write_text(stamp)
    return src


def _sync_changed(new: Path, old: Path) -> None:
    """Make old equal to new, rewriting only files whose bytes changed so unchanged
    sources keep their mtimes (and are not recompiled); files new lacks are deleted."""
    for path in sorted(old.rglob("*"), reverse=True):  # children before their folder
        rel = path.relative_to(old)
        if path.is_dir() and not path.is_symlink():
            if not (new / rel).is_dir():
                shutil.rmtree(path)
        elif not (new / rel).is_file():
            path.unlink()
    for path in new.rglob("*"):
        if path.is_dir():
            continue
        dest = old / path.relative_to(new)
        if dest.is_file() and dest.read_bytes() == path.read_bytes():
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        print(prepare(Path(argv[1])))
    except SourceError as exc:
        print(f"infmllm-gguf build error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
