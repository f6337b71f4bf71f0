"""`python scripts/mirror_tree.py SRC_ROOT DEST [TOP ...]`: mirror the working tree's files (tracked
and untracked-but-not-ignored, as git lists them; every file under the TOPs when given) into DEST,
rewriting only files whose content changed (unchanged mtimes keep ninja builds there incremental)
and deleting files that are gone. Used by scripts/check_cuda_build.sh and scripts/compat.sh, which
build in such a mirror, never in the repo (the repo's build belongs to its own venv)."""
import filecmp
import os
import shutil
import subprocess
import sys

SKIP_DIRS = {"__pycache__", ".pytest_cache", ".git", "build"}


def files(root, tops):
    if not tops:
        out = subprocess.run(["git", "-C", root, "ls-files", "-co", "--exclude-standard"], check=True,
                             capture_output=True, text=True).stdout.split("\n")
        return {f for f in out if f and os.path.isfile(os.path.join(root, f))}
    want = set()
    for top in tops:
        src = os.path.join(root, top)
        if os.path.isfile(src):
            want.add(top)
        for d, dirs, fs in os.walk(src):
            dirs[:] = [x for x in dirs if x not in SKIP_DIRS]
            want.update(os.path.relpath(os.path.join(d, f), root) for f in fs if not f.endswith((".so", ".pyc")))
    return want


def main(root, dst, *tops):
    want = files(root, tops)
    for rel in sorted(want):
        s, t = os.path.join(root, rel), os.path.join(dst, rel)
        if not (os.path.exists(t) and filecmp.cmp(s, t, shallow=False)):
            os.makedirs(os.path.dirname(t), exist_ok=True)
            shutil.copy2(s, t)
    for d, dirs, fs in os.walk(dst):
        dirs[:] = [x for x in dirs if x not in SKIP_DIRS and not x.endswith(".egg-info")]
        for f in fs:
            rel = os.path.relpath(os.path.join(d, f), dst)
            if rel not in want and not f.endswith((".so", ".pyc")):
                os.remove(os.path.join(d, f))


if __name__ == "__main__":
    main(*sys.argv[1:])
