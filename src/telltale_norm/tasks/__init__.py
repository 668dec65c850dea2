"""Offline lm-eval tasks made by telltale-norm's own generators (no dataset download).

- `telltale_wordproblems`: 600 GSM8K-format word problems (levels 1-3, 5-shot from 50 more),
  scored exactly like lm-eval's `gsm8k` (its YAML is `include`d).
- `telltale_wordproblems_easy`: 120 one-step problems; quick enough for CI.
- `telltale_mc`: 300 four-option questions scored by log-likelihood.
- tag `telltale`: all three.

lm-eval resolves `include:` and `data_files` relative to the working directory, not to the
YAML, so the YAMLs need absolute paths of this installation. They ship as templates
(`lm_eval/*.yaml.in`) beside the JSONL data; `task_dir()` fills in the paths and writes the
YAMLs to a cache folder named after their content, which is the folder to give lm-eval:

    python -m lm_eval ... --include_path "$(python -m telltale_norm.lm_eval --task_dir)"

`python -m telltale_norm.lm_eval` adds that folder by itself when a bundled task is named.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import string
import tempfile
from pathlib import Path

__all__ = ["BUNDLED_TASKS", "DATA_DIR", "TAG", "regenerate_data", "task_dir"]

DATA_DIR = Path(__file__).resolve().parent / "lm_eval"
TAG = "telltale"
BUNDLED_TASKS = ("telltale_wordproblems", "telltale_wordproblems_easy", "telltale_mc")


def _datasets() -> dict[str, list[dict]]:
    """The bundled data files and their records (train splits are the few-shot pools)."""
    # Imported here, not at the top: `python -m telltale_norm.tasks.word_problems` imports
    # this package first, and runpy warns when the module it runs is already imported.
    from telltale_norm.tasks import multiple_choice, word_problems

    problems = word_problems.generate(650, seed=0)
    easy = word_problems.generate(140, seed=1, levels=(1,))
    return {
        "wordproblems_train.jsonl": problems[:50],
        "wordproblems_test.jsonl": problems[50:],
        "wordproblems_easy_train.jsonl": easy[:20],
        "wordproblems_easy_test.jsonl": easy[20:],
        "mc_test.jsonl": multiple_choice.generate(300, seed=0),
    }


def regenerate_data(out_dir: str | os.PathLike = DATA_DIR) -> list[Path]:
    """Write the bundled JSONL files (deterministic: the shipped files are this output)."""
    from telltale_norm.tasks.word_problems import write_jsonl

    return [write_jsonl(records, Path(out_dir) / name) for name, records in _datasets().items()]


def _gsm8k_yaml() -> Path:
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or spec.origin is None:
        raise RuntimeError("lm-eval is not installed: pip install lm-eval")
    path = Path(spec.origin).parent / "tasks" / "gsm8k" / "gsm8k.yaml"
    if not path.is_file():
        raise RuntimeError(f"this lm-eval has no built-in gsm8k task at {path}")
    return path


def _write_atomic(path: Path, text: str) -> None:
    # Concurrent runs may write the same folder: each file appears whole or not at all.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def task_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder of the bundled task YAMLs for lm-eval's `--include_path`, written if needed.

    It is `<cache root>/lm_eval_tasks/<hash>` (cache root as for models, `cache_dir`
    replaces it); the hash covers the YAMLs' content, so installations with different paths
    never share a folder and an up-to-date folder is never rewritten.
    """
    from telltale_norm.models import cache_root

    values = {"gsm8k_yaml": str(_gsm8k_yaml()), "data_dir": str(DATA_DIR)}
    yamls = {
        template.name.removesuffix(".in"):
            string.Template(template.read_text()).substitute(values)
        for template in sorted(DATA_DIR.glob("*.yaml.in"))
    }
    digest = hashlib.sha256(repr(sorted(yamls.items())).encode()).hexdigest()[:16]
    folder = cache_root(cache_dir) / "lm_eval_tasks" / digest
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in yamls.items():
        path = folder / name
        if not path.is_file() or path.read_text() != text:
            _write_atomic(path, text)
    return folder
